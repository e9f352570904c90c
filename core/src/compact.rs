//! Optional times and counts of seconds in fewer bytes than `Option` gives them. Every idle account
//! keeps several (its token's times, its state file's, its last report's): `Option<Timestamp>` is 24
//! bytes and `Option<i64>` 16, since neither has a spare bit pattern to mean `None`. These find one
//! in a value that no real time or lifetime takes.

use jiff::Timestamp;

/// An `Option<Timestamp>` in 16 bytes: seconds and nanoseconds (negative before 1970), `None` as
/// nanoseconds `i32::MIN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(i64, i32);

impl Stamp {
    pub const NONE: Stamp = Stamp(0, i32::MIN);

    pub fn new(t: Option<Timestamp>) -> Stamp {
        t.map_or(Stamp::NONE, |t| Stamp(t.as_second(), t.subsec_nanosecond()))
    }

    /// Seconds and nanoseconds, as kept (`None` is nanoseconds `i32::MIN`).
    pub fn parts(self) -> (i64, i32) {
        (self.0, self.1)
    }

    /// From [`parts`](Self::parts); `None` when they are no time jiff can hold.
    pub fn from_parts(secs: i64, nanos: i32) -> Option<Stamp> {
        if nanos == i32::MIN {
            return Some(Stamp::NONE);
        }
        let s = Stamp(secs, nanos);
        s.get().is_some().then_some(s)
    }

    pub fn get(self) -> Option<Timestamp> {
        (self.1 != i32::MIN)
            .then(|| Timestamp::new(self.0, self.1).ok())
            .flatten()
    }
}

/// An `Option<i64>` in 8 bytes, `None` as `i64::MIN`: a count of seconds, or a time in whole seconds
/// (jiff's earliest time is far later than `i64::MIN` seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secs(i64);

impl Secs {
    pub const NONE: Secs = Secs(i64::MIN);

    /// `i64::MIN` itself, which no token file's lifetime is, reads back as `None`.
    pub fn new(n: Option<i64>) -> Secs {
        n.map_or(Secs::NONE, Secs)
    }

    pub fn get(self) -> Option<i64> {
        (self != Secs::NONE).then_some(self.0)
    }

    /// A time, floored to the second.
    pub fn of_time(t: Option<Timestamp>) -> Secs {
        Secs::new(t.map(|t| t.as_second()))
    }

    pub fn time(self) -> Option<Timestamp> {
        self.get().and_then(|s| Timestamp::from_second(s).ok())
    }
}

impl Default for Secs {
    fn default() -> Self {
        Secs::NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_as_it_was_kept() {
        for t in [
            None,
            Some(Timestamp::UNIX_EPOCH),
            Some(Timestamp::new(1_800_000_000, 999_999_999).unwrap()),
            Some(Timestamp::new(-1, -1).unwrap()),
            Some(Timestamp::MIN),
            Some(Timestamp::MAX),
        ] {
            assert_eq!(Stamp::new(t).get(), t);
            assert_eq!(
                Secs::of_time(t).time(),
                t.map(|t| Timestamp::from_second(t.as_second()).unwrap())
            );
        }
        for n in [None, Some(0), Some(-1), Some(21_599), Some(i64::MAX)] {
            assert_eq!(Secs::new(n).get(), n);
        }
        assert_eq!((size_of::<Stamp>(), size_of::<Secs>()), (16, 8));
    }
}
