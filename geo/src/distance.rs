//! Great-circle distance and the RTT estimate routing uses (DESIGN section 4).
//!
//! # Reading of the design
//!
//! DESIGN section 4 scores a node by "estimated client->node RTT (great-circle distance / 100 km
//! per ms, x path stretch 1.5)", and section 7 records "Fiber: ~1 ms RTT per 100 km". Light in
//! fibre covers about 200 km per ms one way, so 100 km of distance costs 0.5 ms out and 0.5 ms
//! back: 1 ms of *round trip*. `km_per_ms` is therefore kilometres of great-circle distance per
//! millisecond of round-trip time, and [`estimated_rtt_ms`] returns a round-trip time, directly
//! comparable with the gateway->node RTT measured on a QUIC connection. The path stretch
//! accounts for fibre routes being longer than the great circle.

use crate::location::Coords;

/// Mean Earth radius (IUGG), km.
pub const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Great-circle kilometres per millisecond of round-trip time in fibre (DESIGN section 4).
pub const RTT_KM_PER_MS: f64 = 100.0;

/// How much longer real paths are than the great circle (DESIGN section 4).
pub const PATH_STRETCH: f64 = 1.5;

/// Great-circle distance in km (haversine formula, mean Earth radius).
pub fn distance_km(a: Coords, b: Coords) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    // Rounding can push h a hair above 1 for antipodal points; clamp so asin stays defined.
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Estimated round-trip time in ms between two points: `distance / km_per_ms * path_stretch`
/// (see the module docs for why this is a round trip). Returns `f64::INFINITY` when
/// `km_per_ms` is not a positive number or the result is not finite, so that a misconfigured
/// estimate ranks a node last rather than first.
pub fn estimated_rtt_ms(a: Coords, b: Coords, km_per_ms: f64, path_stretch: f64) -> f64 {
    if km_per_ms.is_nan() || km_per_ms <= 0.0 {
        return f64::INFINITY;
    }
    let rtt = distance_km(a, b) / km_per_ms * path_stretch;
    if rtt.is_finite() {
        rtt
    } else {
        f64::INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(lat: f64, lon: f64) -> Coords {
        Coords { lat, lon }
    }

    #[test]
    fn known_distances() {
        // London - Paris, about 344 km by great circle.
        let d = distance_km(c(51.5074, -0.1278), c(48.8566, 2.3522));
        assert!((d - 343.5).abs() < 2.0, "{d}");
        // New York JFK - London LHR, about 5540 km.
        let d = distance_km(c(40.6413, -73.7781), c(51.4700, -0.4543));
        assert!((d - 5540.0).abs() < 15.0, "{d}");
        // A quarter of the equator is a quarter of the circumference.
        let d = distance_km(c(0.0, 0.0), c(0.0, 90.0));
        let quarter = std::f64::consts::PI * EARTH_RADIUS_KM / 2.0;
        assert!((d - quarter).abs() < 1e-6, "{d}");
        // Antipodes: half the circumference, no NaN.
        let d = distance_km(c(90.0, 0.0), c(-90.0, 0.0));
        assert!(
            (d - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6,
            "{d}"
        );
        assert_eq!(distance_km(c(10.0, 20.0), c(10.0, 20.0)), 0.0);
    }

    #[test]
    fn distance_is_symmetric_and_wraps_the_date_line() {
        let a = c(64.0, 179.5);
        let b = c(64.0, -179.5);
        assert!((distance_km(a, b) - distance_km(b, a)).abs() < 1e-9);
        // One degree of longitude at 64 N is about 48.8 km, not 359 degrees' worth.
        assert!(distance_km(a, b) < 50.0);
    }

    #[test]
    fn rtt_estimate() {
        let a = c(0.0, 0.0);
        let b = c(0.0, 9.0);
        let d = distance_km(a, b);
        let rtt = estimated_rtt_ms(a, b, RTT_KM_PER_MS, PATH_STRETCH);
        assert!((rtt - d / 100.0 * 1.5).abs() < 1e-9);
        // About 1000 km: 10 ms by fibre distance, 15 ms with stretch.
        assert!((rtt - 15.0).abs() < 0.2, "{rtt}");
        assert_eq!(estimated_rtt_ms(a, b, 0.0, 1.5), f64::INFINITY);
        assert_eq!(estimated_rtt_ms(a, b, -3.0, 1.5), f64::INFINITY);
        assert_eq!(estimated_rtt_ms(a, b, f64::NAN, 1.5), f64::INFINITY);
    }
}
