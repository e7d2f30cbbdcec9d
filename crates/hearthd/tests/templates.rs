//! Creates from templates: the first machine of an image boots and becomes the template, later
//! ones restore it with their own identity and disk; `cold` boots; a template that fails to
//! restore falls back to a boot; a changed image makes a new template and retires the old.

mod common;

use common::*;
use hearth_api::{ArtifactRef, ForkRequest, Phase};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How machine `id`'s VMM was started: restored (`-incoming`) or booted.
fn restored(d: &Daemon, id: &str) -> bool {
    let (_, cmdline) = processes_mentioning(&d.path().join("machines").join(id).join(""))
        .into_iter()
        .find(|(_, c)| c.contains("qemu"))
        .expect("the machine's VMM");
    cmdline.contains("-incoming")
}

/// The complete templates in the data root.
fn templates(d: &Daemon) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(d.path().join("templates"))
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("template.json").exists());
    found.sort();
    found
}

fn create(id: &str, artifact: &ArtifactRef, cold: bool) -> hearth_api::CreateMachineRequest {
    let mut req = create_req(id);
    req.artifact = artifact.clone();
    req.cold = cold.then_some(true);
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_restore_a_template_of_their_image() {
    // A copy of the image of this test's own, to change it later.
    let images = tempfile::Builder::new()
        .prefix("hearth-timg")
        .tempdir_in("/tmp")
        .unwrap();
    for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
        std::fs::copy(image_dir().join(f), images.path().join(f)).unwrap();
    }
    let artifact = |dir: &Path| ArtifactRef {
        kernel_image_url: file_url(&dir.join("vmlinux")),
        rootfs_url: file_url(&dir.join("rootfs.ext4")),
        initrd_url: Some(file_url(&dir.join("initrd.img"))),
    };
    let image = artifact(images.path());
    let d = Daemon::start_with(&[
        "--templates",
        "true",
        "--artifact-dir",
        images.path().to_str().unwrap(),
    ])
    .await;
    let c = &d.client;

    // The first machine boots, and its snapshot becomes the template.
    c.create_machine(&create("first", &image, false))
        .await
        .unwrap();
    assert!(!restored(&d, "first"));
    let made = templates(&d);
    assert_eq!(made.len(), 1, "{}", d.log());
    sh(c, "first", "echo first > /root/mine; sync").await;

    // The next restores it, with an identity, clock, entropy and disk of its own.
    let m = c
        .create_machine(&create("second", &image, false))
        .await
        .unwrap();
    assert_eq!(m.phase, Phase::Running);
    assert!(restored(&d, "second"), "{}", d.log());
    assert_eq!(m.restored_from, None);
    let ident = |id: &'static str| async move {
        sh(
            c,
            id,
            "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1",
        )
        .await
        .stdout
    };
    let (a, b) = (ident("first").await, ident("second").await);
    assert!(b.starts_with("second\n"), "{b}");
    let lines = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
    assert_ne!(lines(&a)[1], lines(&b)[1], "the same machine-id");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let guest: f64 = sh(c, "second", "date +%s")
        .await
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!((guest - now).abs() <= 2.0, "clock off by {}", guest - now);
    assert_eq!(
        sh(c, "second", "cat /root/mine 2>&1 | grep -c 'No such'")
            .await
            .stdout
            .trim(),
        "1",
        "the first machine's later write reached the second's disk"
    );
    sh(c, "second", "echo second > /root/mine; sync").await;
    assert_eq!(sh(c, "first", "cat /root/mine").await.stdout, "first\n");
    // A machine made from a template forks (and so snapshots) as any other.
    c.fork(
        "second",
        &ForkRequest {
            machine_id: "second-fork".into(),
            guest_config: None,
            network: None,
            ports: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        sh(c, "second-fork", "cat /root/mine").await.stdout,
        "second\n"
    );

    // `cold` boots.
    c.create_machine(&create("third", &image, true))
        .await
        .unwrap();
    assert!(!restored(&d, "third"));
    assert_eq!(templates(&d), made);

    // A template whose files changed is removed; the create boots and makes a new one (under
    // the same key), which the next create restores.
    let vmstate = made[0].join("vmstate");
    let mut bytes = std::fs::read(&vmstate).unwrap();
    bytes[..4].copy_from_slice(b"XXXX");
    std::fs::write(&vmstate, bytes).unwrap();
    c.create_machine(&create("fourth", &image, false))
        .await
        .unwrap();
    assert!(!restored(&d, "fourth"));
    assert_eq!(
        d.log_count("a template that fails its checks is removed"),
        1
    );
    assert_eq!(templates(&d), made, "no template under the same key again");
    assert_ne!(std::fs::read(&vmstate).unwrap()[..4], *b"XXXX");
    c.create_machine(&create("fifth", &image, false))
        .await
        .unwrap();
    assert!(restored(&d, "fifth"), "{}", d.log());
    // Two machines restored from one template draw different random bytes.
    let (b, e) = (ident("second").await, ident("fifth").await);
    assert_ne!(lines(&b)[2], lines(&e)[2], "the same random bytes");
    assert_ne!(lines(&b)[1], lines(&e)[1], "the same machine-id");

    // Another size is another template, beside the first.
    let mut big = create("big", &image, false);
    big.memory_mib = Some(384);
    c.create_machine(&big).await.unwrap();
    assert!(!restored(&d, "big"));
    let both = templates(&d);
    assert_eq!(both.len(), 2);
    assert!(both.contains(&made[0]));

    // A changed image finds no template: it boots, makes its own, and the old one of the
    // same size goes (the other size's stays until a machine of that size is made).
    let rootfs = images.path().join("rootfs.ext4");
    let original = images.path().join("rootfs.original");
    std::fs::copy(&rootfs, &original).unwrap();
    let out = std::process::Command::new("tune2fs")
        .args(["-L", "changed"])
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.create_machine(&create("sixth", &image, false))
        .await
        .unwrap();
    assert!(!restored(&d, "sixth"));
    let now = templates(&d);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(&made[0]), "{now:?}");
    let other: Vec<_> = both.iter().filter(|t| **t != made[0]).collect();
    assert!(now.contains(other[0]), "{now:?}");

    // Past `--max-templates` the least recently used go, whenever they were made: the bigger
    // machines' template, older but just restored (the image as it was), stays.
    std::fs::copy(&original, &rootfs).unwrap();
    let mut big2 = create("big2", &image, false);
    big2.memory_mib = Some(384);
    c.create_machine(&big2).await.unwrap();
    assert!(restored(&d, "big2"), "{}", d.log());
    let mut d = d;
    d.add_args(&["--max-templates", "1"]);
    d.restart().await;
    let c = &d.client;
    assert_eq!(templates(&d), [other[0].clone()]);
    // A collection while a machine of the image runs keeps its template.
    let gc = c.gc().await.unwrap();
    assert_eq!(gc.removed_templates, 0, "{gc:?}");
    assert_eq!(templates(&d), [other[0].clone()]);

    for m in [
        "first",
        "second",
        "second-fork",
        "third",
        "fourth",
        "fifth",
        "big",
        "sixth",
        "big2",
    ] {
        c.delete_machine(m).await.unwrap();
    }
    assert!(d.vmm_pids().is_empty());

    // With no machine left, the collection removes the images' blobs, and their templates.
    let gc = c.gc().await.unwrap();
    assert_eq!(gc.removed_templates, 1, "{gc:?}");
    assert!(gc.freed_bytes > 0, "{gc:?}");
    assert!(templates(&d).is_empty(), "{:?}", templates(&d));
}
