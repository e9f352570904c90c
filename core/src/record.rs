//! A compact binary form of what an account's start needs (the machine's [`Held`](crate::machine::Held)
//! and the [`AccountState`](crate::state::AccountState)), for the start index the daemon keeps beside
//! the token files. Fixed-width little-endian numbers and length-prefixed strings: reading one back is
//! a few loads, where the token file's JSON is a parse. A reader that runs short or meets a value out of
//! range says so with `None`, and the caller reads the files instead.

use crate::compact::{Secs, Stamp};

/// Appends values to a record.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn secs(&mut self, s: Secs) {
        self.i64(s.get().unwrap_or(i64::MIN));
    }

    pub fn stamp(&mut self, s: Stamp) {
        let (secs, nanos) = s.parts();
        self.i64(secs);
        self.u32(nanos as u32);
    }

    /// Bytes up to 64 KiB long, with their length first; false (and nothing written) when longer.
    pub fn bytes(&mut self, b: &[u8]) -> bool {
        let Ok(len) = u16::try_from(b.len()) else {
            return false;
        };
        self.u16(len);
        self.0.extend_from_slice(b);
        true
    }

    /// An optional string: a flag, then the string.
    pub fn opt_str(&mut self, s: Option<&str>) -> bool {
        match s {
            None => {
                self.u8(0);
                true
            }
            Some(s) => {
                self.u8(1);
                self.bytes(s.as_bytes())
            }
        }
    }
}

/// Reads values back in the order they were written.
#[derive(Debug)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    pub fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }

    pub fn secs(&mut self) -> Option<Secs> {
        self.i64().map(|s| Secs::new((s != i64::MIN).then_some(s)))
    }

    pub fn stamp(&mut self) -> Option<Stamp> {
        let secs = self.i64()?;
        let nanos = self.u32()? as i32;
        Stamp::from_parts(secs, nanos)
    }

    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.u16()?);
        let (head, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(head)
    }

    pub fn opt_str(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(std::str::from_utf8(self.bytes()?).ok()?.to_owned())),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn values_read_back_in_order_and_a_short_record_is_refused() {
        let mut w = Writer::default();
        w.u8(7);
        w.u16(65_535);
        w.u32(u32::MAX);
        w.u64(1 << 63);
        w.i64(-5);
        w.secs(Secs::NONE);
        w.secs(Secs::new(Some(21_599)));
        let t = Some(Timestamp::new(1_800_000_000, 999_999_999).unwrap());
        w.stamp(Stamp::new(t));
        w.stamp(Stamp::NONE);
        assert!(w.bytes(b"name"));
        assert!(w.opt_str(None));
        assert!(w.opt_str(Some("KOE322")));
        assert!(!w.bytes(&vec![0; 70_000]));
        let bytes = w.0;
        let mut r = Reader(&bytes);
        assert_eq!(r.u8(), Some(7));
        assert_eq!(r.u16(), Some(65_535));
        assert_eq!(r.u32(), Some(u32::MAX));
        assert_eq!(r.u64(), Some(1 << 63));
        assert_eq!(r.i64(), Some(-5));
        assert_eq!(r.secs(), Some(Secs::NONE));
        assert_eq!(r.secs().and_then(Secs::get), Some(21_599));
        assert_eq!(r.stamp().map(Stamp::get), Some(t));
        assert_eq!(r.stamp(), Some(Stamp::NONE));
        assert_eq!(r.bytes(), Some(&b"name"[..]));
        assert_eq!(r.opt_str(), Some(None));
        assert_eq!(r.opt_str(), Some(Some("KOE322".to_owned())));
        assert!(r.is_empty());
        for cut in 0..bytes.len() {
            let mut r = Reader(&bytes[..cut]);
            let whole = (|| {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.i64()?;
                r.secs()?;
                r.secs()?;
                r.stamp()?;
                r.stamp()?;
                r.bytes()?;
                r.opt_str()?;
                r.opt_str()
            })();
            assert!(whole.is_none(), "a record cut at {cut} bytes read as whole");
        }
    }

    #[test]
    fn a_time_out_of_range_is_refused() {
        let mut w = Writer::default();
        w.i64(i64::MAX);
        w.u32(0);
        assert_eq!(Reader(&w.0).stamp(), None);
    }
}
