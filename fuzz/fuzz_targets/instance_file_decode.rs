//! Drives the instance file's strict decoder (`guest_proto::instance_file`,
//! what `reddog-guest` reads from the role disk) with arbitrary bytes and
//! checks:
//! - nothing panics; input over the size limit is refused by its length;
//! - whatever decodes passes the field checks and re-encodes to bytes that
//!   decode to the same file, are canonical (encoding again gives the same
//!   bytes) and are never longer than the input plus the newline and an
//!   `env` the input may leave out (a `net` object, when present, re-encodes
//!   to itself: addresses have one spelling).
#![no_main]

use guest_proto::instance_file::{InstanceFile, InstanceFileError, MAX_INSTANCE_FILE_BYTES};
use libfuzzer_sys::fuzz_target;

/// What the encoder may add to the shortest input: `,"env":{}` (an input may
/// leave `env` out) and the newline.
const MAX_GROWTH: usize = r#","env":{}"#.len() + 1;

fuzz_target!(|data: &[u8]| {
    let file = match InstanceFile::decode(data) {
        Ok(f) => f,
        Err(InstanceFileError::TooLarge { len }) => {
            assert_eq!(len, data.len());
            assert!(len > MAX_INSTANCE_FILE_BYTES);
            return;
        }
        Err(_) => {
            assert!(data.len() <= MAX_INSTANCE_FILE_BYTES);
            return;
        }
    };
    file.check().expect("a decoded file passes its checks");
    match file.encode() {
        Ok(bytes) => {
            assert!(
                bytes.len() <= data.len() + MAX_GROWTH,
                "the encoder is compact"
            );
            let again = InstanceFile::decode(&bytes).expect("an encoded file decodes");
            assert_eq!(again, file);
            assert_eq!(again.encode().expect("re-encodes"), bytes, "canonical");
        }
        // Only an input close to the limit can grow past it.
        Err(InstanceFileError::TooLarge { len }) => {
            assert!(len > MAX_INSTANCE_FILE_BYTES && len <= data.len() + MAX_GROWTH);
        }
        Err(e) => panic!("a decoded file fails to encode: {e}"),
    }
});
