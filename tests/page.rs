//! The page for people at `GET /`: what anonymous callers may pull, with `docker pull`
//! commands, paginated, under a strict Content-Security-Policy — checked over HTTP and
//! rendered in a real headless browser (Debian's chromium).

mod common;

use common::image::{UploadMode, push_image};
use common::{Stack, StackOptions, command, pseudo_random_bytes};

const RULES: &str = r#"
[[rules]]
repositories = ["secret/**"]
pull = ["pusher"]
push = ["pusher"]
"#;

async fn stack_with_images(extra_repos: usize) -> Stack {
    let stack = Stack::start_with(StackOptions {
        extra_tables: RULES.into(),
        ..StackOptions::default()
    })
    .await;
    let pusher = stack.pusher();
    let layers = vec![pseudo_random_bytes(512, 1)];
    for tag in ["v1", "v2"] {
        push_image(&pusher, "public/app", tag, &layers, UploadMode::Monolithic).await;
    }
    push_image(
        &pusher,
        "secret/plans",
        "v1",
        &layers,
        UploadMode::Monolithic,
    )
    .await;
    for i in 0..extra_repos {
        push_image(
            &pusher,
            &format!("more/r{i:03}"),
            "latest",
            &layers,
            UploadMode::Monolithic,
        )
        .await;
    }
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_lists_what_anonymous_may_pull_and_pages() {
    // 2 visible + 1 hidden + 60: more than one page of 50.
    let stack = stack_with_images(60).await;
    let host = stack.gate.authority();
    let resp = stack.client().get("/").await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    resp.assert_api_version_once("page");
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = resp.header("content-security-policy").expect("CSP header");
    assert!(
        csp.starts_with("default-src 'none'; style-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    let html = resp.text();
    assert!(!html.contains("<script"), "no script");
    assert!(
        html.contains(&format!("docker pull {host}/more/r000:latest")),
        "{html}"
    );
    assert!(
        !html.contains("secret"),
        "a repository anonymous may not pull is listed:\n{html}"
    );
    // Lexical order: more/… before public/…; the first page ends before public/app.
    assert!(
        !html.contains("public/app"),
        "public/app belongs on page 2: {html}"
    );
    let next = html
        .split("href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a link to the next page");
    assert!(next.starts_with("/?last="), "{next}");
    let page2 = stack.client().get(&next.replace("&amp;", "&")).await;
    assert_eq!(page2.status.as_u16(), 200);
    let html2 = page2.text();
    for tag in ["v1", "v2"] {
        let line = format!("docker pull {host}/public/app:{tag}");
        assert!(html2.contains(&line), "{line} missing from\n{html2}");
    }
    assert!(!html2.contains("more/r000"), "{html2}");
    assert!(!html2.contains("secret"), "{html2}");
    stack.gate.stop().await;
}

/// Decode a PNG into (width, height, RGBA pixels).
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::ALPHA);
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_renders_in_a_real_browser() {
    let stack = stack_with_images(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let shot = dir.path().join("page.png");
    let url = format!("{}/", stack.gate.base_url());
    let browse = |extra: &[&str]| {
        let profile = tempfile::tempdir().expect("profile dir");
        let out = command("chromium", "chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1000,700",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // The DOM as the browser built it: the page's content, and no CSP violation (the
    // inline style must be allowed by its hash).
    let dom = browse(&["--dump-dom"]);
    let text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        text.contains(&format!(
            "docker pull {}/public/app:v2",
            stack.gate.authority()
        )),
        "rendered DOM:\n{text}"
    );
    let log = String::from_utf8_lossy(&dom.stderr);
    assert!(
        !log.contains("Content Security Policy"),
        "CSP violation in the browser:\n{log}"
    );

    let shot_out = browse(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&shot_out.stderr)
        )
    });
    let (w, h, pixels) = decode_png(&png);
    assert_eq!((w, h), (1000, 700), "screenshot size");
    // The page has a white background and dark text: both must be on the picture,
    // and the styled <code> background (#f3f3f3) proves the stylesheet applied.
    let px = |r: u8, g: u8, b: u8| {
        pixels
            .chunks(4)
            .filter(|p| p[0] == r && p[1] == g && p[2] == b)
            .count()
    };
    let white = px(255, 255, 255);
    let dark = pixels
        .chunks(4)
        .filter(|p| p[0] < 80 && p[1] < 80 && p[2] < 80)
        .count();
    let code_bg = px(0xf3, 0xf3, 0xf3);
    let total = (w * h) as usize;
    assert!(
        white > total / 2,
        "mostly white background: {white} of {total}"
    );
    assert!(dark > 200, "text on the page: {dark} dark pixels");
    assert!(
        code_bg > 500,
        "the stylesheet applied (code background): {code_bg} pixels"
    );
    stack.gate.stop().await;
}
