//! `ticker watch`: a full-screen live quote board (ratatui). The board is plain state fed
//! by the resilient stream's events and redrawn at a steady rate, not per tick, so a
//! heavy feed costs only the bookkeeping. The terminal is restored on quit, on Ctrl-C and
//! on panic (ratatui's init installs the hook).

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use clap::Args;
use ratatui::{
    crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
    Frame,
};
use tokio::sync::mpsc;

use super::{
    connect::{exit, CliError, ConnectOpts},
    live::{self, Command, Event},
    subscribe::describe,
};
use crate::clock;

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Symbols to show.
    #[arg(required = true)]
    pub symbols: Vec<String>,
    /// Redraws per second.
    #[arg(long, default_value_t = 10.0)]
    pub fps: f64,
    /// Give up after this many consecutive failed reconnect attempts (default: never).
    #[arg(long)]
    pub max_retries: Option<u32>,
}

const HISTORY: usize = 24;
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One symbol's line on the board.
#[derive(Debug, Default, Clone)]
pub struct Quote {
    first: Option<f64>,
    last: f64,
    high: f64,
    low: f64,
    seq: u64,
    latency_ms: f64,
    lagged: u64,
    ticks: u64,
    ticks_at_last_second: u64,
    per_sec: f64,
    history: VecDeque<f64>,
}

impl Quote {
    fn price(&mut self, ltp: f64, seq: u64) {
        if self.first.is_none() {
            (self.first, self.high, self.low) = (Some(ltp), ltp, ltp);
        }
        self.high = self.high.max(ltp);
        self.low = self.low.min(ltp);
        self.last = ltp;
        self.seq = seq;
        self.history.push_back(ltp);
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    fn sparkline(&self) -> String {
        let (lo, hi) = self
            .history
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &p| (l.min(p), h.max(p)));
        self.history
            .iter()
            .map(|&p| {
                let x = if hi > lo { (p - lo) / (hi - lo) } else { 0.5 };
                BARS[((x * 7.0).round() as usize).min(7)]
            })
            .collect()
    }
}

/// What a key press asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Interrupt,
    Send(Command),
}

/// The board's whole state.
#[derive(Debug, Default)]
pub struct Board {
    quotes: BTreeMap<String, Quote>,
    selected: usize,
    /// Text typed after `a`, while adding a symbol.
    input: Option<String>,
    status: String,
    last_second: Option<Instant>,
}

impl Board {
    pub fn new(symbols: &[String]) -> Board {
        let mut board = Board::default();
        for s in symbols {
            board.quotes.entry(s.clone()).or_default();
        }
        board.status = "connecting…".into();
        board
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Tick(t) => {
                let q = self.quotes.entry(t.symbol.clone()).or_default();
                q.price(t.ltp, t.seq);
                q.ticks += 1;
                q.latency_ms = (clock::now_unix_nanos() - t.event_time_unix_nanos) as f64 / 1e6;
            }
            Event::Snapshot(t) => self
                .quotes
                .entry(t.symbol.clone())
                .or_default()
                .price(t.ltp, t.seq),
            Event::Lagged { symbol, dropped } => {
                self.quotes.entry(symbol.clone()).or_default().lagged += dropped;
                self.status = describe(event);
            }
            Event::Missed { symbol, missed, .. } => {
                self.quotes.entry(symbol.clone()).or_default().lagged += missed;
                self.status = describe(event);
            }
            Event::Rejected { symbol, .. } => {
                self.quotes.remove(symbol);
                self.status = describe(event);
            }
            Event::Unsubscribed(symbol) => {
                self.quotes.remove(symbol);
                self.status = format!("removed {symbol}; live: {} symbols", self.quotes.len());
            }
            Event::Subscribed(symbol) => {
                self.quotes.entry(symbol.clone()).or_default();
                self.status = format!("live: {} symbols", self.quotes.len());
            }
            _ => self.status = describe(event),
        }
        self.selected = self.selected.min(self.quotes.len().saturating_sub(1));
    }

    /// Once a second: updates per second of each symbol.
    pub fn tick_clock(&mut self, now: Instant) {
        let elapsed = self.last_second.map(|t| now.duration_since(t));
        if elapsed.is_none_or(|e| e >= Duration::from_secs(1)) {
            let secs = elapsed.map_or(1.0, |e| e.as_secs_f64());
            for q in self.quotes.values_mut() {
                q.per_sec = (q.ticks - q.ticks_at_last_second) as f64 / secs;
                q.ticks_at_last_second = q.ticks;
            }
            self.last_second = Some(now);
        }
    }

    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind != KeyEventKind::Press {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Interrupt;
        }
        if let Some(input) = self.input.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    let symbol = input.trim().to_string();
                    self.input = None;
                    if !symbol.is_empty() {
                        self.status = format!("subscribing to {symbol}…");
                        return Action::Send(Command::Add(symbol));
                    }
                }
                KeyCode::Esc => self.input = None,
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Char(c) => input.push(c),
                _ => {}
            }
            return Action::None;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Char('a') | KeyCode::Char('+') => {
                self.input = Some(String::new());
                Action::None
            }
            KeyCode::Char('d') | KeyCode::Char('-') | KeyCode::Delete => {
                match self.quotes.keys().nth(self.selected).cloned() {
                    Some(symbol) => Action::Send(Command::Remove(symbol)),
                    None => Action::None,
                }
            }
            KeyCode::Up => {
                self.selected = self.selected.saturating_sub(1);
                Action::None
            }
            KeyCode::Down => {
                self.selected = (self.selected + 1).min(self.quotes.len().saturating_sub(1));
                Action::None
            }
            _ => Action::None,
        }
    }

    pub fn render(&self, frame: &mut Frame) {
        let [table_area, footer] =
            Layout::vertical([Constraint::Min(3), Constraint::Length(2)]).areas(frame.area());
        let header = Row::new([
            "SYMBOL", "LAST", "CHG", "CHG%", "HIGH", "LOW", "UPD/S", "LAT ms", "LAGGED", "TREND",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD));
        let rows = self.quotes.iter().enumerate().map(|(i, (symbol, q))| {
            let change = q.first.map_or(0.0, |f| q.last - f);
            let pct = q
                .first
                .filter(|f| *f != 0.0)
                .map_or(0.0, |f| change / f * 100.0);
            let color = if change > 0.0 {
                Color::Green
            } else if change < 0.0 {
                Color::Red
            } else {
                Color::Reset
            };
            let style = if i == self.selected {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            let seen = q.first.is_some();
            let num = |v: f64| if seen { format!("{v:.4}") } else { "-".into() };
            Row::new(vec![
                Cell::from(symbol.clone()),
                Cell::from(num(q.last)),
                Cell::from(format!("{change:+.4}")).style(Style::new().fg(color)),
                Cell::from(format!("{pct:+.2}%")).style(Style::new().fg(color)),
                Cell::from(num(q.high)),
                Cell::from(num(q.low)),
                Cell::from(format!("{:.0}", q.per_sec)),
                Cell::from(format!("{:.2}", q.latency_ms)),
                Cell::from(q.lagged.to_string()),
                Cell::from(q.sparkline()),
            ])
            .style(style)
        });
        let widths = [
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(11),
            Constraint::Length(9),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Min(HISTORY as u16),
        ];
        let table = Table::new(rows, widths)
            .header(header)
            .block(Block::new().borders(Borders::ALL).title(" ticker watch "));
        frame.render_widget(table, table_area);
        let help = match &self.input {
            Some(text) => format!("add symbol: {text}█   (Enter to subscribe, Esc to cancel)"),
            None => "q quit   a add   d remove selected   ↑↓ select".to_string(),
        };
        frame.render_widget(
            Paragraph::new(vec![Line::from(self.status.clone()), Line::from(help)]),
            footer,
        );
    }
}

pub async fn run(opts: ConnectOpts, args: WatchArgs) -> Result<(), CliError> {
    let (commands_tx, mut events, stream) =
        live::spawn(opts, args.symbols.clone(), args.max_retries, 8192);
    let (keys_tx, mut keys) = mpsc::channel(64);
    // crossterm's blocking reader lives on its own thread.
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => match event::read() {
                Ok(TermEvent::Key(key)) => {
                    if keys_tx.blocking_send(key).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            },
            Ok(false) => {
                if keys_tx.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    });

    let mut terminal = ratatui::init();
    let mut board = Board::new(&args.symbols);
    let mut redraw =
        tokio::time::interval(Duration::from_secs_f64(1.0 / args.fps.clamp(1.0, 60.0)));
    let result = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => board.apply(&event),
                None => break Ok(()),
            },
            key = keys.recv() => match key.map(|k| board.handle_key(k)) {
                Some(Action::Quit) | None => break Ok(()),
                Some(Action::Interrupt) => break Err(CliError::new(exit::INTERRUPTED, "interrupted")),
                Some(Action::Send(command)) => { let _ = commands_tx.send(command).await; }
                Some(Action::None) => {}
            },
            _ = redraw.tick() => {
                board.tick_clock(Instant::now());
                if let Err(e) = terminal.draw(|f| board.render(f)) {
                    break Err(CliError::new(1, format!("cannot draw: {e}")));
                }
            }
        }
    };
    ratatui::restore();
    if stream.is_finished() {
        if let Ok(Err(e)) = stream.await {
            return Err(e);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::pb::TickerResponse;

    fn tick(symbol: &str, ltp: f64, seq: u64) -> Event {
        Event::Tick(TickerResponse {
            symbol: symbol.into(),
            ltp,
            seq,
            event_time_unix_nanos: clock::now_unix_nanos(),
            ..Default::default()
        })
    }

    fn screen(board: &Board) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 8)).unwrap();
        terminal.draw(|f| board.render(f)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        buffer
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect::<Vec<_>>()
            .chunks(120)
            .map(|r| r.concat())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn renders_prices_changes_and_extremes() {
        let mut board = Board::new(&["AAPL".into(), "MSFT".into()]);
        board.apply(&Event::Subscribed("AAPL".into()));
        board.apply(&tick("AAPL", 100.0, 1));
        board.apply(&tick("AAPL", 102.5, 2));
        board.apply(&tick("AAPL", 101.0, 3));
        board.apply(&Event::Lagged {
            symbol: "AAPL".into(),
            dropped: 7,
        });
        let text = screen(&board);
        let aapl = text.lines().find(|l| l.contains("AAPL")).expect(&text);
        for expected in [
            "101.0000", "+1.0000", "+1.00%", "102.5000", "100.0000", " 7 ",
        ] {
            assert!(aapl.contains(expected), "{expected:?} missing in {aapl:?}");
        }
        assert!(text.contains("MSFT"), "{text}");
        assert!(text.contains("lagged on AAPL"), "{text}");
    }

    #[test]
    fn keys_add_remove_and_quit() {
        let mut board = Board::new(&["AAPL".into()]);
        let key = |c| KeyEvent::new(c, KeyModifiers::NONE);
        assert_eq!(board.handle_key(key(KeyCode::Char('a'))), Action::None);
        for c in "IBM".chars() {
            board.handle_key(key(KeyCode::Char(c)));
        }
        assert!(screen(&board).contains("add symbol: IBM"));
        assert_eq!(
            board.handle_key(key(KeyCode::Enter)),
            Action::Send(Command::Add("IBM".into()))
        );
        assert_eq!(
            board.handle_key(key(KeyCode::Char('d'))),
            Action::Send(Command::Remove("AAPL".into()))
        );
        assert_eq!(
            board.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Interrupt
        );
        assert_eq!(board.handle_key(key(KeyCode::Char('q'))), Action::Quit);
    }
}
