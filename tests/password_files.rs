//! The Apache htpasswd and group files, re-read while the gate serves: users and
//! group members added, passwords changed, and broken files that must be refused
//! while the old ones keep working.

mod common;

use std::time::Duration;

use base64::Engine as _;
use sha1::Digest as _;

use common::client::{Client, empty};
use common::gate::{apr1_line, bcrypt_line};
use common::pki::openssl;
use common::{PUSHER, Stack, VIEWER, WATCH_INTERVAL_MS, eventually};

/// The status of `POST /v2/<repo>/blobs/uploads/`: 202 for a pusher, 403 for a
/// valid user outside the group, 401 for bad credentials.
async fn start_upload(client: &Client, repo: &str) -> u16 {
    client
        .request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], empty())
        .await
        .status
        .as_u16()
}

async fn wait_for_status(client: &Client, what: &str, expected: u16) {
    eventually(what, || async {
        (start_upload(client, "reload/app").await == expected).then_some(())
    })
    .await;
}

fn sha_crypt_line(user: &str, password: &str, flag: &str) -> String {
    let output = openssl(&["passwd", flag, password]);
    let hash = String::from_utf8(output.stdout).expect("utf-8 hash");
    format!("{user}:{}\n", hash.trim())
}

fn sha1_line(user: &str, password: &str) -> String {
    let digest = sha1::Sha1::digest(password.as_bytes());
    format!(
        "{user}:{{SHA}}{}\n",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

fn bcrypt_line_version(user: &str, password: &str, version: bcrypt::Version) -> String {
    let hash = bcrypt::hash_with_result(password, 4)
        .expect("bcrypt")
        .format_for_version(version);
    format!("{user}:{hash}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_groups_and_passwords_changed_on_disk_take_effect() {
    let stack = Stack::start().await;
    let gate = &stack.gate;
    let nora = stack.client().with_basic("nora", "nora-new-here");
    assert_eq!(
        start_upload(&nora, "reload/app").await,
        401,
        "nora is unknown"
    );
    let mark = stack.pusher();
    assert_eq!(start_upload(&mark, "reload/app").await, 202, "mark pushes");

    // A new user in the push group, every hash format Apache's htpasswd writes.
    let formats = [
        (
            "nora",
            "nora-new-here",
            bcrypt_line("nora", "nora-new-here"),
        ),
        ("ana", "ana-pw", sha_crypt_line("ana", "ana-pw", "-5")),
        ("ben", "ben-pw", sha_crypt_line("ben", "ben-pw", "-6")),
        ("cy", "cy-pw", sha1_line("cy", "cy-pw")),
        (
            "dee",
            "dee-pw",
            bcrypt_line_version("dee", "dee-pw", bcrypt::Version::TwoA),
        ),
        (
            "eve",
            "eve-pw",
            bcrypt_line_version("eve", "eve-pw", bcrypt::Version::TwoB),
        ),
        ("fay", "fay-pw", apr1_line("fay", "fay-pw")),
    ];
    let mut htpasswd = format!(
        "{}{}",
        bcrypt_line(PUSHER.0, PUSHER.1),
        apr1_line(VIEWER.0, VIEWER.1)
    );
    for (_, _, line) in &formats {
        htpasswd.push_str(line);
    }
    gate.write_htpasswd(&htpasswd);
    gate.write_groups(&format!(
        "pusher: {} nora ana ben cy dee eve fay\nreaders: {}\n",
        PUSHER.0, VIEWER.0
    ));
    for (user, password, line) in &formats {
        let client = stack.client().with_basic(user, password);
        wait_for_status(
            &client,
            &format!(
                "{user} ({}…) to be able to push",
                &line[..line.len().min(12)]
            ),
            202,
        )
        .await;
        let wrong = stack.client().with_basic(user, "not-it");
        assert_eq!(
            start_upload(&wrong, "reload/app").await,
            401,
            "{user} with a wrong password"
        );
    }

    // A changed password: the old one stops working (no stale cache), the new works.
    let without_mark: String = htpasswd
        .lines()
        .filter(|l| !l.starts_with("mark:"))
        .map(|l| format!("{l}\n"))
        .collect();
    gate.write_htpasswd(&format!(
        "{without_mark}{}",
        bcrypt_line(PUSHER.0, "marks-new-password")
    ));
    wait_for_status(&mark, "mark's old password to stop working", 401).await;
    let new_mark = stack.client().with_basic(PUSHER.0, "marks-new-password");
    assert_eq!(start_upload(&new_mark, "reload/app").await, 202);

    // Group changes: mark leaves the push group, vera joins it.
    gate.write_groups(&format!(
        "pusher: {} nora\nreaders: {}\n",
        VIEWER.0, PUSHER.0
    ));
    wait_for_status(&new_mark, "mark to lose push rights", 403).await;
    wait_for_status(&stack.viewer(), "vera to gain push rights", 202).await;

    // A user removed from the htpasswd file is gone.
    let without_nora: String = without_mark
        .lines()
        .filter(|l| !l.starts_with("nora:"))
        .map(|l| format!("{l}\n"))
        .collect();
    gate.write_htpasswd(&without_nora);
    wait_for_status(&nora, "nora's removal", 401).await;
    stack.gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_password_file_is_refused_and_the_old_users_keep_working() {
    let stack = Stack::start().await;
    let gate = &stack.gate;
    // Users who are checked for the first time only after a broken file was
    // written, so no cached check can stand in for the file.
    let fresh: Vec<(String, String)> = (0..6)
        .map(|i| (format!("p{i}"), format!("password-{i}")))
        .collect();
    let mut htpasswd = format!(
        "{}{}",
        bcrypt_line(PUSHER.0, PUSHER.1),
        apr1_line(VIEWER.0, VIEWER.1)
    );
    for (user, password) in &fresh {
        htpasswd.push_str(&bcrypt_line(user, password));
    }
    let names: Vec<&str> = fresh.iter().map(|(u, _)| u.as_str()).collect();
    let groups = format!(
        "pusher: {} {}\nreaders: {}\n",
        PUSHER.0,
        names.join(" "),
        VIEWER.0
    );
    gate.write_groups(&groups);
    gate.write_htpasswd(&htpasswd);
    // p0 is the probe that the good file was loaded.
    let p0 = stack.client().with_basic(&fresh[0].0, &fresh[0].1);
    wait_for_status(&p0, "the extended password file to be loaded", 202).await;

    let broken: [(&str, &str); 5] = [
        (
            "binary garbage",
            "\u{0}\u{1}\u{2}garbage\u{ff}\n\u{7f}\u{7f}\n",
        ),
        (
            "a plain-text password",
            "mark:mark-pushes-images\nvera:vera-only-looks\n",
        ),
        ("a DES crypt hash", "mark:rqXexS6ZhobKA\n"),
        (
            "a line without a colon",
            "this line is not an htpasswd entry\n",
        ),
        ("a truncated bcrypt hash", "mark:$2y$04$abc\n"),
    ];
    for (i, (what, contents)) in broken.iter().enumerate() {
        gate.write_htpasswd(contents);
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 15)).await;
        let (user, password) = &fresh[i + 1];
        let client = stack.client().with_basic(user, password);
        assert_eq!(
            start_upload(&client, "reload/app").await,
            202,
            "after {what} was written over the htpasswd file, {user} (never checked \
             before) must still be able to push with the old file"
        );
        assert_eq!(
            start_upload(&stack.viewer(), "reload/app").await,
            403,
            "after {what}: vera is still a valid user outside the group"
        );
        let wrong = stack
            .client()
            .with_basic(PUSHER.0, "mark-pushes-images-not");
        assert_eq!(start_upload(&wrong, "reload/app").await, 401);
    }
    // A broken group file is refused too.
    gate.write_htpasswd(&htpasswd);
    gate.write_groups("pusher mark p1 p2\n\u{0}\u{0}\n");
    tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS * 15)).await;
    assert_eq!(start_upload(&stack.pusher(), "reload/app").await, 202);

    // The watcher was alive all along: a good file is taken.
    gate.write_htpasswd(&format!("{htpasswd}{}", bcrypt_line("late", "late-pw")));
    gate.write_groups(&groups.replace("pusher: ", "pusher: late "));
    let late = stack.client().with_basic("late", "late-pw");
    wait_for_status(&late, "a good password file after the broken ones", 202).await;
    stack.gate.stop().await;
}
