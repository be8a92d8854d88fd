//! ISO 3166 country and subdivision codes, as the geofence configuration uses them.

/// Every officially assigned ISO 3166-1 alpha-2 code (249 of them, sorted), as published by the
/// ISO 3166 Maintenance Agency and shipped in Debian's `iso-codes` 4.15. User-assigned codes are
/// not in this list; see [`is_iso_country`] for the one exception the configuration accepts.
pub const ISO_3166_1_ALPHA2: &[&str] = &[
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// Kosovo. `XK` is a user-assigned code, not an official one, but it is what GeoIP databases
/// (MaxMind's included) report for Kosovo, so a rule must be able to name it.
pub const KOSOVO: &str = "XK";

/// Whether `code` is an officially assigned ISO 3166-1 alpha-2 code, or `XK` (Kosovo; see
/// [`KOSOVO`]). Codes are upper case: `"cn"` is not accepted, so that a file says one thing one way.
pub fn is_iso_country(code: &str) -> bool {
    code == KOSOVO || ISO_3166_1_ALPHA2.binary_search(&code).is_ok()
}

/// Why `code` is not a usable ISO 3166-2 subdivision code, or `None` when it is one.
///
/// The accepted shape is `CC-XXX`: a country accepted by [`is_iso_country`], a hyphen, and 1 to 3
/// upper-case letters or digits (`UA-43`, `GB-ENG`, `FR-75C`). Whether the subdivision exists is
/// not checked: the list changes every year and a stale list would reject real codes.
pub(crate) fn subdivision_problem(code: &str) -> Option<String> {
    let Some((country, sub)) = code.split_once('-') else {
        return Some(format!(
            "{code:?} is not an ISO 3166-2 subdivision code (expected CC-XXX)"
        ));
    };
    if !is_iso_country(country) {
        return Some(format!(
            "{code:?}: {country:?} is not an ISO 3166-1 alpha-2 country code"
        ));
    }
    let shape_ok = (1..=3).contains(&sub.len())
        && sub
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !shape_ok {
        return Some(format!(
            "{code:?} is not an ISO 3166-2 subdivision code (expected CC-XXX: a country code, a \
             hyphen and 1 to 3 upper-case letters or digits)"
        ));
    }
    None
}

/// Why `code` is not an ISO 3166-1 alpha-2 country code, with a hint for the usual slips.
pub(crate) fn country_problem(code: &str) -> String {
    let upper = code.to_ascii_uppercase();
    if upper != code && is_iso_country(&upper) {
        format!(
            "{code:?} is not an ISO 3166-1 alpha-2 country code (codes are upper case: {upper:?})"
        )
    } else {
        format!("{code:?} is not an ISO 3166-1 alpha-2 country code")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_unique_and_complete() {
        assert_eq!(ISO_3166_1_ALPHA2.len(), 249);
        assert!(ISO_3166_1_ALPHA2.windows(2).all(|w| w[0] < w[1]));
        assert!(ISO_3166_1_ALPHA2
            .iter()
            .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())));
    }

    #[test]
    fn countries() {
        for ok in ["CN", "US", "UA", "AX", "ZW", "SS", "XK", "AD"] {
            assert!(is_iso_country(ok), "{ok}");
        }
        // User-assigned, reserved, withdrawn and lower-case codes are refused.
        for bad in ["XX", "EU", "UK", "ZZ", "AN", "YU", "cn", "C", "CNN", ""] {
            assert!(!is_iso_country(bad), "{bad}");
        }
    }

    #[test]
    fn subdivisions() {
        for ok in ["UA-43", "UA-09", "GB-ENG", "FR-75C", "US-CA", "CN-1"] {
            assert_eq!(subdivision_problem(ok), None, "{ok}");
        }
        assert_eq!(
            subdivision_problem("XX-43").unwrap(),
            "\"XX-43\": \"XX\" is not an ISO 3166-1 alpha-2 country code"
        );
        for bad in ["UA-", "UA-4321", "UA-4 ", "ua-43", "UA-ab", "UA43-1"] {
            assert!(subdivision_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn country_hint_for_lower_case() {
        assert_eq!(
            country_problem("cn"),
            "\"cn\" is not an ISO 3166-1 alpha-2 country code (codes are upper case: \"CN\")"
        );
        assert_eq!(
            country_problem("XX"),
            "\"XX\" is not an ISO 3166-1 alpha-2 country code"
        );
    }
}
