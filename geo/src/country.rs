//! Small copyable codes: ISO 3166-1 countries, ISO 3166-2 subdivisions and continents.
//!
//! They are stored as bytes rather than `String`s so that a [`crate::Location`] is `Copy` and a
//! lookup never allocates.

use serde::{Serialize, Serializer};
use std::fmt;

/// An ISO 3166-1 alpha-2 country code (`US`), or any other two upper-case ASCII letters a
/// database uses in that place (`XK`, `EU`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Country([u8; 2]);

impl Country {
    /// Parses two ASCII letters; lower case is accepted and upper-cased. Anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Self([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    /// Builds a code from two bytes, or `None` unless both are ASCII upper-case letters.
    pub const fn from_bytes(b: [u8; 2]) -> Option<Self> {
        if b[0].is_ascii_uppercase() && b[1].is_ascii_uppercase() {
            Some(Self(b))
        } else {
            None
        }
    }

    /// The code, e.g. `"US"`.
    pub fn as_str(&self) -> &str {
        // Construction guarantees two ASCII letters, so this never takes the fallback branch.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// The two bytes of the code.
    pub const fn bytes(&self) -> [u8; 2] {
        self.0
    }

    /// Position in the 26 x 26 space of two-letter codes (0..676), used for bitsets.
    pub const fn index(&self) -> usize {
        (self.0[0] - b'A') as usize * 26 + (self.0[1] - b'A') as usize
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Country {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The longest subdivision code we keep: two letters, a hyphen and up to three alphanumerics
/// (ISO 3166-2 allows at most three after the hyphen).
const SUBDIVISION_MAX: usize = 6;

/// An ISO 3166-2 subdivision code including its country prefix, e.g. `UA-43` (Crimea).
///
/// GeoIP2 City databases store the part after the hyphen (`{"iso_code":"43"}`) under the
/// record's country; [`Subdivision::from_parts`] joins the two.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subdivision {
    bytes: [u8; SUBDIVISION_MAX],
    len: u8,
}

impl Subdivision {
    /// Parses `CC-XXX` (one to three ASCII alphanumerics after the hyphen); lower case is
    /// upper-cased. Anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let (cc, code) = s.split_once('-')?;
        Self::from_parts(Country::parse(cc)?, code)
    }

    /// Joins a country and the subdivision part GeoIP2 stores (`"43"`), or `None` when `code`
    /// is not one to three ASCII alphanumerics.
    pub fn from_parts(country: Country, code: &str) -> Option<Self> {
        let c = code.as_bytes();
        if c.is_empty() || c.len() > 3 || !c.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let mut bytes = [0u8; SUBDIVISION_MAX];
        let cc = country.bytes();
        bytes[0] = cc[0];
        bytes[1] = cc[1];
        bytes[2] = b'-';
        for (dst, src) in bytes[3..].iter_mut().zip(c) {
            *dst = src.to_ascii_uppercase();
        }
        Some(Self {
            bytes,
            len: (3 + c.len()) as u8,
        })
    }

    /// The country part.
    pub fn country(&self) -> Country {
        Country([self.bytes[0], self.bytes[1]])
    }

    /// The full code, e.g. `"UA-43"`.
    pub fn as_str(&self) -> &str {
        // Construction guarantees ASCII, so this never takes the fallback branch.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("??")
    }
}

impl fmt::Debug for Subdivision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Subdivision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Subdivision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A two-letter continent code as GeoIP2 uses them: `AF AN AS EU NA OC SA`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Continent([u8; 2]);

impl Continent {
    /// Parses two ASCII letters (upper-cased), or `None`.
    pub fn parse(s: &str) -> Option<Self> {
        Country::parse(s).map(|c| Self(c.bytes()))
    }

    pub(crate) const fn from_raw(b: [u8; 2]) -> Self {
        Self(b)
    }

    /// The code, e.g. `"EU"`.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Continent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Continent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Continent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_parse_and_index() {
        let us = Country::parse("us").unwrap();
        assert_eq!(us.as_str(), "US");
        assert_eq!(Country::parse("AA").unwrap().index(), 0);
        assert_eq!(Country::parse("ZZ").unwrap().index(), 675);
        assert_eq!(
            Country::parse("UA").unwrap().index(),
            (b'U' - b'A') as usize * 26
        );
        for bad in ["", "U", "USA", "U1", "ü", "  "] {
            assert!(Country::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Country::from_bytes(*b"us").is_none());
    }

    #[test]
    fn subdivision_parse_and_join() {
        let crimea = Subdivision::parse("UA-43").unwrap();
        assert_eq!(crimea.as_str(), "UA-43");
        assert_eq!(crimea.country().as_str(), "UA");
        let joined = Subdivision::from_parts(Country::parse("UA").unwrap(), "43").unwrap();
        assert_eq!(crimea, joined);
        assert_eq!(Subdivision::parse("gb-eng").unwrap().as_str(), "GB-ENG");
        for bad in ["UA", "UA-", "UA-1234", "UA-4 3", "U-43", "UA43", "-43"] {
            assert!(Subdivision::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn serializes_as_strings() {
        let v = serde_json::to_value((
            Country::parse("KP").unwrap(),
            Subdivision::parse("UA-09").unwrap(),
            Continent::parse("EU").unwrap(),
        ))
        .unwrap();
        assert_eq!(v, serde_json::json!(["KP", "UA-09", "EU"]));
    }
}
