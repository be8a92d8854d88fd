//! [`lookup_report`]: one address explained, for the CLI and the admin API.

use crate::db::GeoDb;
use crate::policy::{Decision, Policy};
use nearpath_config::WorkloadKind;
use serde_json::{json, Map, Value};
use std::net::IpAddr;

fn decision_json(d: &Decision) -> Value {
    json!({
        "allowed": d.is_allowed(),
        "rule": d.rule(),
        "side": d.side(),
        "reason": d.reason(),
    })
}

/// Looks `ip` up and evaluates the policy for each class in `classes`:
///
/// ```json
/// {"ip","embedded":null|{"kind","ipv4"},"country","subdivision","continent","lat","lon",
///  "accuracy_km","source":{"country","coords"},"anonymous":{six flags},
///  "decisions":{"<class>":{"controlled":bool,
///     "serve":{"allowed","rule","side","reason","by_workload":{"game":{..},"inference":{..}}},
///     "onboard":{"allowed","rule","side","reason"}}}}
/// ```
///
/// `embedded` is set when `ip` is an IPv6 address that embeds an IPv4 address (`kind`: one of
/// `ipv4_mapped`, `ipv4_compatible`, `ipv4_translated`, `6to4`, `teredo`, `nat64`): the
/// location and decisions are then those of `ipv4`.
///
/// `serve` answers "may a client at this address use this class at all": it is
/// [`Policy::check_client`], which applies the client-side rules, the anonymous-IP and the
/// unknown-location policy to the client and leaves node-side and residency rules out, since
/// they depend on where the serving node is. It is allowed only when every workload kind is;
/// otherwise `rule`/`reason` are those of the first denied kind (game, then inference), and
/// `by_workload` has each kind's answer. `onboard` answers "may a node at this address join
/// with this class" ([`Policy::check_onboard`]).
pub fn lookup_report(db: &GeoDb, policy: &Policy, ip: IpAddr, classes: &[String]) -> Value {
    let loc = db.lookup(ip);
    let mut decisions = Map::new();
    for class in classes {
        let id = policy.class_id(class);
        let game = policy.check_client(&loc, id, WorkloadKind::Game);
        let inference = policy.check_client(&loc, id, WorkloadKind::Inference);
        let first_denied = [&game, &inference].into_iter().find(|d| !d.is_allowed());
        let mut serve = decision_json(first_denied.unwrap_or(&game));
        serve["by_workload"] = json!({
            "game": decision_json(&game),
            "inference": decision_json(&inference),
        });
        let onboard = policy.check_onboard(&loc, id);
        decisions.insert(
            class.clone(),
            json!({
                "controlled": policy.is_controlled(id),
                "serve": serve,
                "onboard": decision_json(&onboard),
            }),
        );
    }
    json!({
        "ip": ip.to_string(),
        "embedded": loc.embedded,
        "country": loc.country,
        "subdivision": loc.subdivision,
        "continent": loc.continent,
        "lat": loc.coords.map(|c| c.lat),
        "lon": loc.coords.map(|c| c.lon),
        "accuracy_km": loc.accuracy_km,
        "source": {"country": loc.country_source, "coords": loc.coords_source},
        "anonymous": loc.anonymous,
        "decisions": decisions,
    })
}
