//! `kiln bake` and `kiln images` end to end, on the real binary, store and sandbox.

#![allow(clippy::unwrap_used)]

mod harness;

use std::fs;

use harness::Project;

const TWO_IMAGES: &str = r#"
project = "shop"

variable "greeting" { default = "hello" }

image "base" {
  base = "dir:./rootfs"
}

image "web" {
  base = image.base
  provisioner "file" {
    source      = "site"
    destination = "/www"
  }
  provisioner "shell" {
    inline = ["echo \"${var.greeting}\" > /www/greeting.txt"]
  }
  entrypoint = ["/bin/sh", "-c", "echo serving"]
  labels     = { version = "1.0.0" }
}
"#;

fn shop() -> Project {
    let p = Project::new(TWO_IMAGES);
    p.busybox_rootfs("rootfs");
    p.write("site/index.html", "<h1>shop</h1>\n");
    p
}

#[test]
fn second_bake_is_all_cached_with_the_same_digest() {
    let p = shop();
    let first = p.kiln(&["bake"]).ok();
    assert!(first.stderr.contains("web [2/2] shell"), "{}", first.stderr);
    assert!(
        !first.stderr.contains(": cached"),
        "a first bake runs every step:\n{}",
        first.stderr
    );

    let second = p.kiln(&["bake"]).ok();
    assert_eq!(first.digest_of("web"), second.digest_of("web"));
    assert_eq!(first.digest_of("base"), second.digest_of("base"));
    assert_eq!(
        second.stderr.matches(": cached").count(),
        3,
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("web: sha256:"), "{}", second.stderr);
    assert!(second.stderr.contains("unchanged"), "{}", second.stderr);
}

#[test]
fn a_changed_last_step_rebuilds_only_that_step() {
    let p = shop();
    let first = p.kiln(&["bake", "web"]).ok();
    let second = p.kiln(&["bake", "web", "-var", "greeting=bonjour"]).ok();
    assert_ne!(first.digest_of("web"), second.digest_of("web"));
    assert!(
        second.stderr.contains("web [1/2] file site → /www: cached"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("web [2/2] shell"),
        "{}",
        second.stderr
    );
    assert_eq!(
        second.stderr.matches(": cached").count(),
        2,
        "base + file step:\n{}",
        second.stderr
    );

    // The variable can come from the environment too, and lands in the image.
    let third = p
        .kiln_env(&["bake", "web"], &[("KILN_VAR_greeting", "bonjour")])
        .ok();
    assert_eq!(third.digest_of("web"), second.digest_of("web"));
}

#[test]
fn same_config_in_two_clean_stores_gives_the_same_digest() {
    let a = shop();
    let b = shop();
    // Different mtimes and a different directory must not matter.
    fs::write(b.path().join("site/index.html"), "<h1>shop</h1>\n").unwrap();
    let da = a.kiln(&["bake"]).ok().digest_of("web");
    let db = b.kiln(&["bake"]).ok().digest_of("web");
    assert_eq!(da, db);

    // SOURCE_DATE_EPOCH is part of the image, so it changes the digest.
    let c = shop();
    let dc = c
        .kiln_env(&["bake"], &[("SOURCE_DATE_EPOCH", "1700000000")])
        .ok()
        .digest_of("web");
    assert_ne!(da, dc);
}

#[test]
fn a_failing_shell_step_changes_nothing_and_the_next_bake_resumes() {
    let p = Project::new(
        r#"
project = "p"
image "app" {
  base = "dir:./rootfs"
  provisioner "file" {
    source      = "data.txt"
    destination = "/data.txt"
  }
  provisioner "shell" {
    inline = ["echo preparing", "echo 'disk full' >&2", "exit 3"]
  }
}
"#,
    );
    p.busybox_rootfs("rootfs");
    p.write("data.txt", "data\n");
    let failed = p.kiln(&["bake"]).fails();
    assert!(
        failed
            .stderr
            .contains("image `app` step 3 (shell (3 commands)) failed with exit code 3"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("| disk full"),
        "the last output lines are shown:\n{}",
        failed.stderr
    );
    let ls = p.kiln(&["images", "ls", "--json"]).ok();
    assert_eq!(
        ls.stdout.trim(),
        "[]",
        "nothing is tagged after a failed bake"
    );

    p.write(
        "kiln.hcl",
        &fs::read_to_string(p.path().join("kiln.hcl"))
            .unwrap()
            .replace("exit 3", "true"),
    );
    let resumed = p.kiln(&["bake"]).ok();
    assert!(
        resumed
            .stderr
            .contains("app [1/3] base dir:./rootfs: cached"),
        "{}",
        resumed.stderr
    );
    assert!(
        resumed
            .stderr
            .contains("app [2/3] file data.txt → /data.txt: cached"),
        "{}",
        resumed.stderr
    );
}

#[test]
fn a_shell_step_without_bubblewrap_is_refused() {
    let p = shop();
    let run = p
        .kiln_env(&["bake"], &[("KILN_BWRAP", "/nonexistent/bwrap")])
        .fails();
    assert!(
        run.stderr.contains("shell provisioners need bubblewrap"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("never runs provisioners on the host"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_missing_provisioner_source_points_at_the_config_line() {
    let p = Project::new(
        "project = \"p\"\nimage \"app\" {\n  provisioner \"file\" {\n    source = \"nope/app\"\n    destination = \"/app\"\n  }\n}\n",
    );
    let run = p.kiln(&["bake"]).fails();
    assert!(
        run.stderr
            .contains("kiln.hcl:4:14: provisioner source `nope/app` not found"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_tar_slip_base_is_refused_and_nothing_escapes() {
    let p = Project::new("project = \"p\"\nimage \"evil\" { base = \"tar:./evil.tar\" }\n");
    // A tar whose second member climbs out of the root.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_path("ok.txt").unwrap();
    header.set_cksum();
    builder.append(&header, &b"ok"[..]).unwrap();
    let mut evil = tar::Header::new_gnu();
    evil.set_size(5);
    evil.set_mode(0o644);
    evil.set_uid(0);
    evil.set_gid(0);
    evil.as_old_mut().name[..12].copy_from_slice(b"../../pwned\0");
    evil.set_cksum();
    builder.append(&evil, &b"owned"[..]).unwrap();
    fs::write(p.path().join("evil.tar"), builder.into_inner().unwrap()).unwrap();

    let run = p.kiln(&["bake"]).fails();
    assert!(run.stderr.contains("../../pwned"), "{}", run.stderr);
    assert!(run.stderr.contains("escapes"), "{}", run.stderr);
    assert!(!p.path().join("pwned").exists());
    assert!(!p.path().parent().unwrap().join("pwned").exists());
    assert_eq!(p.kiln(&["images", "ls", "--json"]).ok().stdout.trim(), "[]");
}

#[test]
fn verify_names_a_corrupted_blob_and_rebuild_reproduces() {
    let p = shop();
    let digest = p.kiln(&["bake"]).ok().digest_of("web");
    let ok = p.kiln(&["images", "verify", "web", "--rebuild"]).ok();
    assert!(ok.stdout.contains("blobs verified"), "{}", ok.stdout);
    assert!(ok.stdout.contains("same digest"), "{}", ok.stdout);

    // Flip one byte of the last layer blob.
    let inspect = p.kiln(&["images", "inspect", "web"]).ok();
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(v["record"]["digest"], digest.as_str());
    let layer = v["manifest"]["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let blob = p
        .store()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&blob).unwrap();
    bytes[600] ^= 0xff;
    fs::write(&blob, bytes).unwrap();

    let bad = p.kiln(&["images", "verify", "web"]).fails();
    assert!(
        bad.stderr.contains(&layer),
        "the corrupt blob is named:\n{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("is corrupt"), "{}", bad.stderr);
}

#[test]
fn export_docker_archive_is_accepted_by_skopeo() {
    let p = shop();
    let digest = p.kiln(&["bake"]).ok().digest_of("web");
    p.kiln(&[
        "images", "export", "web", "--format", "docker", "-o", "web.tar",
    ])
    .ok();
    p.kiln(&[
        "images",
        "export",
        "web",
        "--format",
        "oci",
        "-o",
        "web-oci.tar",
    ])
    .ok();

    let skopeo = |arg: &str| {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", arg])
            .current_dir(p.path())
            .output()
            .expect("tests need skopeo: run scripts/deps.sh test");
        assert!(
            out.status.success(),
            "skopeo {arg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let oci = skopeo("oci-archive:web-oci.tar");
    // The OCI archive holds the very manifest the store has: same bytes, same digest.
    assert_eq!(format!("sha256:{}", sha256_hex(oci.as_bytes())), digest);
    let docker = skopeo("docker-archive:web.tar");
    let layers = serde_json::from_str::<serde_json::Value>(&docker).unwrap()["layers"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(layers, 3);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn images_rm_and_gc_free_unused_blobs() {
    let p = shop();
    p.kiln(&["bake"]).ok();
    p.kiln(&["bake", "-var", "greeting=second"]).ok();
    let ls = p.kiln(&["images", "ls", "--json"]).ok();
    let listed: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        3,
        "base, web, and the older web: {}",
        ls.stdout
    );

    let gc = p.kiln(&["images", "gc", "--json"]).ok();
    let report: serde_json::Value = serde_json::from_str(&gc.stdout).unwrap();
    assert_eq!(
        report["images_removed"].as_array().unwrap().len(),
        1,
        "{}",
        gc.stdout
    );

    p.kiln(&["images", "rm", "web"]).ok();
    p.kiln(&["images", "inspect", "web"]).fails();
    p.kiln(&["images", "verify", "base"]).ok();
}

#[test]
fn validate_reports_every_mistake_with_its_line() {
    let p = Project::new(
        r#"project = "p"

image "web" {
  bsae = "scratch"
}

service "web" {
  image = image.wbe
  port  = 8080
  health {
    interval = 5
  }
}
"#,
    );
    let run = p.kiln(&["validate"]).fails();
    assert!(run.stderr.contains("kiln.hcl:4:3:"), "{}", run.stderr);
    assert!(
        run.stderr.contains("did you mean `base`?"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("kiln.hcl:8:11:"), "{}", run.stderr);
    assert!(run.stderr.contains("kiln.hcl:11:16:"), "{}", run.stderr);
    assert!(run.stderr.contains("3 errors"), "{}", run.stderr);

    let json = p.kiln(&["validate", "--json"]).fails();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["error_count"], 3);
}

#[test]
fn an_oci_layout_is_a_base_and_its_layers_are_kept() {
    let first = shop();
    let base_digest = first.kiln(&["bake", "web"]).ok().digest_of("web");
    // kiln's store is an OCI image layout, so another project can build on it directly.
    let layout = first.store();
    let second = Project::new(&format!(
        "project = \"q\"\nimage \"app\" {{\n  base = \"oci:{}:web\"\n  provisioner \"shell\" {{ inline = [\"cat /www/greeting.txt > /copied\"] }}\n}}\n",
        layout.display()
    ));
    let run = second.kiln(&["bake"]).ok();
    let v: serde_json::Value =
        serde_json::from_str(&second.kiln(&["images", "inspect", "app"]).ok().stdout).unwrap();
    assert_eq!(
        v["record"]["parent"],
        base_digest.as_str(),
        "{}",
        run.stderr
    );
    let base: serde_json::Value =
        serde_json::from_str(&first.kiln(&["images", "inspect", "web"]).ok().stdout).unwrap();
    let base_layers = base["manifest"]["layers"].as_array().unwrap();
    let layers = v["manifest"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), base_layers.len() + 1);
    assert_eq!(&layers[..base_layers.len()], &base_layers[..]);
    // The run config is inherited.
    assert_eq!(
        v["config"]["config"]["Entrypoint"],
        base["config"]["config"]["Entrypoint"]
    );

    // A tag that is not there is a clear error.
    second.write(
        "kiln.hcl",
        &format!(
            "project = \"q\"\nimage \"app\" {{ base = \"oci:{}:nope\" }}\n",
            layout.display()
        ),
    );
    let bad = second.kiln(&["bake"]).fails();
    assert!(
        bad.stderr.contains("has no image tagged `nope`"),
        "{}",
        bad.stderr
    );
}

#[test]
fn an_unknown_base_and_a_cycle_are_config_errors() {
    let p = Project::new(
        "project = \"p\"\nimage \"a\" { base = image.b }\nimage \"b\" { base = image.a }\nimage \"c\" { base = image.nope }\n",
    );
    let run = p.kiln(&["bake"]).fails();
    assert!(run.stderr.contains("depends on itself"), "{}", run.stderr);
    assert!(run.stderr.contains("kiln.hcl:4:20:"), "{}", run.stderr);
    assert!(
        !p.store().join("index.json").exists(),
        "a bad config touches no store"
    );
}

/// Every entry of a layer blob: (path, uid, gid, mode, mtime).
fn layer_entries(p: &Project, digest: &str) -> Vec<(String, u64, u64, u32, u64)> {
    let blob = p
        .store()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut archive = tar::Archive::new(fs::File::open(blob).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().display().to_string(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
            )
        })
        .collect()
}

#[test]
fn owners_and_modes_are_set_by_the_config_and_kept_from_the_sandbox() {
    let p = Project::new(
        r#"
project = "p"
image "o" {
  base = "dir:./rootfs"
  provisioner "file" {
    source      = "f.txt"
    destination = "/srv/f.txt"
    owner       = "1234:5678"
    mode        = "0600"
  }
  provisioner "shell" {
    inline = ["touch /by-shell", "chown 42:43 /by-shell || true"]
  }
}
"#,
    );
    p.busybox_rootfs("rootfs");
    p.write("f.txt", "secret-ish\n");
    p.kiln(&["bake"]).ok();
    let v: serde_json::Value =
        serde_json::from_str(&p.kiln(&["images", "inspect", "o"]).ok().stdout).unwrap();
    let layers: Vec<String> = v["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();

    // The base directory belongs to whoever checked it out: normalised to root.
    assert!(
        layer_entries(&p, &layers[0])
            .iter()
            .all(|e| (e.1, e.2, e.4) == (0, 0, 0))
    );
    assert_eq!(
        layer_entries(&p, &layers[1]),
        [("srv/f.txt".to_owned(), 1234, 5678, 0o600, 0)]
    );
    let shell = layer_entries(&p, &layers[2]);
    let by_shell = shell.iter().find(|e| e.0 == "by-shell").unwrap();
    let as_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    // As root the sandbox's chown is the image's; otherwise it cannot happen and owners are 0.
    let expected = if as_root { (42, 43) } else { (0, 0) };
    assert_eq!(
        (by_shell.1, by_shell.2, by_shell.4),
        (expected.0, expected.1, 0)
    );
}
