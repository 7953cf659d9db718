//! The board page in a real browser: headless Chromium (WebDriver) against the real
//! `tickerd` binary. It loads, shows live ticks whose seq increases, removes and adds
//! symbols (the address follows), survives a server restart by resuming, and says
//! that ticks were missed when the restarted server's history cannot cover the outage;
//! with a token, a symbol it does not cover keeps its row, marked rejected.
//! A screenshot lands in `target/board.png` (the README's comes from it).

use crate::common;

use common::{browser::Browser, TickerdProcess};
use fantoccini::Locator;

/// The seq the board shows for `symbol` (-1 without a row), as a JS expression.
fn seq(symbol: &str) -> String {
    format!(
        "Number((document.querySelector('tr[data-symbol=\"{symbol}\"] .seq') \
         || {{ textContent: '-1' }}).textContent)"
    )
}

async fn seq_now(browser: &Browser, symbol: &str) -> i64 {
    let value = browser.eval(&format!("return {};", seq(symbol))).await;
    value.parse().expect("a number")
}

/// After a restart: waits until `symbol`'s seq moves from what it shows now, up or down
/// (the old server's seq may still show, and the new one counts from its own start),
/// then until a live tick passes the new value.
async fn ticking_again(browser: &Browser, symbol: &str) {
    let before = seq_now(browser, symbol).await;
    browser
        .until(
            &format!("{symbol}'s seq moved from {before}"),
            &format!("return {} !== {before};", seq(symbol)),
        )
        .await;
    ticking(browser, symbol).await;
}

/// Waits until `symbol`'s seq passes what it shows now.
async fn ticking(browser: &Browser, symbol: &str) {
    let now = seq_now(browser, symbol).await.max(0);
    browser
        .until(
            &format!("{symbol}'s seq past {now}"),
            &format!("return {} > {now};", seq(symbol)),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_shows_live_ticks_and_resumes_after_a_restart() {
    let flags = ["--symbols", "100", "--rate", "2000"];
    let mut args = vec!["--web-listen", "127.0.0.1:0"];
    args.extend(flags);
    let server = TickerdProcess::spawn(&args).await;
    let web = server.web_addr.expect("web listener");
    let browser = Browser::start().await;
    let page = format!("http://{web}/?symbols=SYM01,SYM02,SYM03");
    common::within(browser.client.goto(&page))
        .await
        .expect("page loads");

    // Live ticks on every row, their seq increasing.
    for symbol in ["SYM01", "SYM02", "SYM03"] {
        ticking(&browser, symbol).await;
        ticking(&browser, symbol).await;
    }
    browser
        .until(
            "the connection is live",
            "return document.getElementById('state').dataset.state === 'live';",
        )
        .await;

    // Remove one: its row goes, the address follows.
    let remove = common::within(
        browser
            .client
            .find(Locator::Css("tr[data-symbol=\"SYM03\"] button.remove")),
    )
    .await
    .expect("remove button");
    common::within(remove.click()).await.expect("click");
    assert_eq!(seq_now(&browser, "SYM03").await, -1, "the row is gone");
    let address = browser.eval("return location.search;").await;
    assert_eq!(address, "?symbols=SYM01%2CSYM02");

    // Add one by typing it.
    let input = common::within(browser.client.find(Locator::Id("add-symbol")))
        .await
        .expect("input");
    common::within(input.send_keys("sym04"))
        .await
        .expect("type");
    let add = common::within(browser.client.find(Locator::Id("add")))
        .await
        .expect("add button");
    common::within(add.click()).await.expect("click");
    ticking(&browser, "SYM04").await;
    // Let the sparklines fill a little before the picture.
    for _ in 0..6 {
        ticking(&browser, "SYM01").await;
    }
    let png = common::within(browser.client.screenshot())
        .await
        .expect("screenshot");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../board.png");
    std::fs::write(&shot, png).expect("write the screenshot");

    // Restart the server on the same web port: the board reconnects, resumes every
    // symbol from its last seq, and, the new process having no history of the old one,
    // says ticks were missed; the rows tick again.
    drop(server);
    browser
        .until(
            "the board notices the outage",
            "return document.getElementById('state').dataset.state === 'reconnecting';",
        )
        .await;
    let same_port = web.to_string();
    let mut args = vec!["--web-listen", same_port.as_str()];
    args.extend(flags);
    let _server = TickerdProcess::spawn(&args).await;
    browser
        .until(
            "a missed-ticks notice",
            "return [...document.querySelectorAll('#notices li')]\
             .some(li => li.textContent.includes('SYM01: ticks were missed'));",
        )
        .await;
    browser
        .until(
            "live again",
            "return document.getElementById('state').dataset.state === 'live';",
        )
        .await;
    for symbol in ["SYM01", "SYM02", "SYM04"] {
        ticking_again(&browser, symbol).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_asks_for_a_token_when_the_server_wants_one() {
    let keys = common::Keys::new();
    let secret = keys.path("secret");
    let args = [
        "--web-listen",
        "127.0.0.1:0",
        "--jwt-secret-file",
        secret.to_str().expect("path"),
    ];
    let server = TickerdProcess::spawn(&args).await;
    let web = server.web_addr.expect("web listener");
    let browser = Browser::start().await;
    common::within(browser.client.goto(&format!("http://{web}/?symbols=SYM01")))
        .await
        .expect("page loads");
    browser
        .until(
            "the token field",
            "return !document.getElementById('token-form').hidden;",
        )
        .await;
    let token = common::token("viewer", "SYM*", None, std::time::Duration::from_secs(600));
    let field = common::within(browser.client.find(Locator::Id("token")))
        .await
        .expect("token field");
    common::within(field.send_keys(&token)).await.expect("type");
    let connect = common::within(
        browser
            .client
            .find(Locator::Css("#token-form button[type=submit]")),
    )
    .await
    .expect("connect button");
    common::within(connect.click()).await.expect("click");
    ticking(&browser, "SYM01").await;
    // The token went in the first message, never in the address.
    assert!(!browser.eval("return location.href;").await.contains(&token));

    // A symbol the token does not cover: its row stays, marked with the reason, and
    // the entitled row goes on ticking.
    let input = common::within(browser.client.find(Locator::Id("add-symbol")))
        .await
        .expect("input");
    common::within(input.send_keys("other1\n"))
        .await
        .expect("type");
    let row = "document.querySelector('tr[data-symbol=\"OTHER1\"]')";
    browser
        .until(
            "OTHER1's row marked rejected, the reason in its tooltip",
            &format!(
                "return {row}.classList.contains('rejected') \
                 && {row}.querySelector('.last').textContent === 'rejected' \
                 && {row}.title === 'rejected: not entitled to OTHER1';"
            ),
        )
        .await;
    browser
        .until(
            "a rejection notice",
            "return [...document.querySelectorAll('#notices li')]\
             .some(li => li.textContent.includes('OTHER1: rejected: not entitled to OTHER1'));",
        )
        .await;
    ticking(&browser, "SYM01").await;
}
