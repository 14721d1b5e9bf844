//! Every writable open holds an exclusive advisory lock on the image file: a second writable
//! open of the same file is refused at once (even from the same process), read-only opens
//! take no lock and work beside a writer, and the lock goes with the image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vhd::{CreateOptions, ErrorKind, Format, OpenOptions};

fn second_writable_open_refused(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("disk.{format}"));
    vhd::create(&img, format, &CreateOptions::new(4 << 20)).unwrap();
    let first = vhd::open(&img, format, OpenOptions::read_write()).expect("first writable open");
    first.write_at(&[0x5a; 512], 0).unwrap();
    first.flush().unwrap();
    let before = std::fs::read(&img).unwrap();

    let e = vhd::open(&img, format, OpenOptions::read_write()).expect_err("second writable open");
    assert_eq!(e.kind(), ErrorKind::Locked, "{format}: {e}");
    let msg = e.to_string();
    let want = format!(
        "disk {} is in use by another process (locked)",
        img.display()
    );
    assert!(msg.contains(&want), "{format}: {msg:?} lacks {want:?}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "{format}: the refused open wrote"
    );

    // Read-only opens take no lock: they work beside the writer and see its flushed data.
    let ro = vhd::open(&img, format, OpenOptions::read_only()).expect("read-only beside");
    let mut buf = [0u8; 512];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 512], "{format}");
    // ...and do not stop a writable open.
    drop(first);
    let again = vhd::open(&img, format, OpenOptions::read_write())
        .expect("writable open after the first image is dropped");
    drop(ro);
    drop(again);
}

#[test]
fn raw_second_writable_open_refused() {
    second_writable_open_refused(Format::Raw);
}

#[test]
fn qcow2_second_writable_open_refused() {
    second_writable_open_refused(Format::Qcow2);
}

#[test]
fn vhd_second_writable_open_refused() {
    second_writable_open_refused(Format::Vhd);
}
