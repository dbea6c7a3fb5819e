//! The PostgreSQL frontend/backend protocol, version 3.0, as far as a
//! relaying gateway needs it.
//!
//! Nothing in here does I/O. Frames are peeked by their 5-byte header and
//! relayed as the original bytes; only the few messages that identity, audit
//! and transaction tracking need are decoded, lazily, into borrowed views.

pub mod encoding;
pub mod frame;
pub mod messages;
pub mod sqlstate;
pub mod startup;

pub use frame::{FrameHeader, ProtocolError};
pub use messages::PgError;

/// Randomized robustness checks of every decoder that reads bytes a client
/// (or server) chose: no input may make them panic or allocate what a
/// length field merely announces.
#[cfg(test)]
mod fuzz {
    use bytes::BytesMut;

    use super::{frame, messages, startup};

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let len = (self.next() as usize) % (max + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    /// Mostly-valid inputs find more paths than pure noise: a plausible
    /// header followed by random bytes.
    fn shaped(rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::new();
        let body = rng.bytes(64);
        match rng.next() % 3 {
            0 => {
                v.push(b"QPBEDSCHXFdcfpZ"[(rng.next() % 15) as usize]);
                v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            }
            1 => {
                v.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
                let codes = [196608i32, 80877103, 80877104, 80877102, 131072];
                v.extend_from_slice(&codes[(rng.next() % 5) as usize].to_be_bytes());
            }
            _ => {}
        }
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn decoders_never_panic_on_random_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200_000 {
            let input = if rng.next() % 2 == 0 {
                shaped(&mut rng)
            } else {
                rng.bytes(64)
            };
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(f)) = frame::split_frame(&mut buf, 1 << 20) {
                let body = &f[5..];
                let _ = messages::parse_error_fields(body);
                let _ = messages::parse_command_complete(body);
                let _ = messages::parse_parse(body);
                if let Ok(b) = messages::parse_bind(body) {
                    let _ = b.params_for_audit("UTF8");
                }
                let _ = messages::parse_execute(body);
                let _ = messages::parse_close_or_describe(body);
                let _ = messages::parse_query(body);
            }
            assert!(
                buf.capacity() <= (1 << 20) + 64,
                "reserved more than the limit"
            );
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = startup::split_startup(&mut buf) {}
            assert!(buf.capacity() <= startup::MAX_STARTUP_PACKET + 64);
        }
    }
}

/// Property tests (proptest) of the frame decoder and the startup parser:
/// any bytes, split anywhere, give the same frames as the whole input, never
/// a panic, and never a reservation beyond the limits.
#[cfg(test)]
mod properties {
    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::{frame, startup};

    fn frames(input: &[u8], cut: usize) -> Result<Vec<Vec<u8>>, frame::ProtocolError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let (a, b) = input.split_at(cut.min(input.len()));
        for chunk in [a, b] {
            buf.extend_from_slice(chunk);
            while let Some(f) = frame::split_frame(&mut buf, 4096)? {
                out.push(f.to_vec());
            }
            assert!(buf.capacity() <= 4096 + 2 * input.len() + 64);
        }
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn frame_decoding_does_not_depend_on_how_bytes_arrive(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            cut in 0usize..512,
        ) {
            let whole = frames(&input, input.len());
            let split = frames(&input, cut);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn well_formed_frames_round_trip(
            tag in any::<u8>(),
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
        ) {
            let mut input = Vec::new();
            for body in &bodies {
                input.push(tag);
                input.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                input.extend_from_slice(body);
            }
            let got = frames(&input, input.len() / 2).unwrap();
            prop_assert_eq!(got.len(), bodies.len());
            for (frame, body) in got.iter().zip(&bodies) {
                prop_assert_eq!(&frame[5..], &body[..]);
            }
        }

        #[test]
        fn startup_parsing_never_panics_or_over_reserves(
            input in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = startup::split_startup(&mut buf) {}
            prop_assert!(buf.capacity() <= startup::MAX_STARTUP_PACKET + 256);
        }
    }
}
