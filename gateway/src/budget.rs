//! API keys' spending: UTC calendar periods (days and months), the per-model price table, the
//! in-memory book of what each key spent this day and this month, and the budget check against
//! it. Pure and clock-free (every call takes the wall time): [`crate::auth`] checks budgets on
//! the hot path without a store query, [`crate::meter`] adds each committed usage record, and
//! assembly fills the book from the usage ledger at start, so spend survives restarts.
//!
//! Spend is what the ledger billed (the gateway's own count, never a node's claim). Costs are
//! computed from tokens with the prices configured now, so a price change re-prices the current
//! day and month at once (and the same way after a restart).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Milliseconds in a UTC day (UTC has no daylight saving; leap seconds are not in Unix time).
pub const DAY_MS: u64 = 86_400_000;

/// The most days one usage report may cover (a bounded store query and answer).
pub const MAX_REPORT_DAYS: i64 = 366;

/// The UTC day of `unix_ms`, as days since 1970-01-01.
pub fn day_of(unix_ms: u64) -> i64 {
    (unix_ms / DAY_MS) as i64
}

/// The UTC month of `unix_ms`, as months since January 1970 (`year * 12 + month - 1` minus
/// 1970 × 12).
pub fn month_of(unix_ms: u64) -> i64 {
    month_of_day(day_of(unix_ms))
}

/// The month a day (days since 1970-01-01) belongs to.
pub fn month_of_day(day: i64) -> i64 {
    let (y, m, _) = civil_from_days(day);
    (y - 1970) * 12 + i64::from(m) - 1
}

/// The first day of month `month` (months since January 1970).
pub fn first_day_of_month(month: i64) -> i64 {
    let y = 1970 + month.div_euclid(12);
    let m = month.rem_euclid(12) as u32 + 1;
    days_from_civil(y, m, 1)
}

/// Unix milliseconds at the start of `day` (0 before 1970).
pub fn day_start_ms(day: i64) -> u64 {
    u64::try_from(day).unwrap_or(0).saturating_mul(DAY_MS)
}

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days from 1970-01-01 to (year, month 1..=12, day), proleptic Gregorian (Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day.
pub fn format_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day a strict `YYYY-MM-DD` names (years 1970..=9999, a real calendar date), else `None`.
pub fn parse_day(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if y < 1970 || !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let day = days_from_civil(i64::from(y), m, d);
    // 2023-02-29 would silently be 2023-03-01.
    (civil_from_days(day) == (i64::from(y), m, d)).then_some(day)
}

/// A calendar period budgets count over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// Unix milliseconds when the period containing `now_ms` ends (the next UTC midnight, or
    /// the first of the next month at 00:00 UTC).
    pub fn resets_at_ms(self, now_ms: u64) -> u64 {
        match self {
            Period::Day => day_start_ms(day_of(now_ms) + 1),
            Period::Month => day_start_ms(first_day_of_month(month_of(now_ms) + 1)),
        }
    }
}

/// One of a key's four budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    TokensPerDay,
    TokensPerMonth,
    UsdPerDay,
    UsdPerMonth,
}

impl Budget {
    pub const ALL: [Budget; 4] = [
        Budget::TokensPerDay,
        Budget::TokensPerMonth,
        Budget::UsdPerDay,
        Budget::UsdPerMonth,
    ];

    /// The name in the admin API (`budget_` + this) and the metric label: a bounded set.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::TokensPerDay => "tokens_per_day",
            Budget::TokensPerMonth => "tokens_per_month",
            Budget::UsdPerDay => "usd_per_day",
            Budget::UsdPerMonth => "usd_per_month",
        }
    }

    pub fn period(self) -> Period {
        match self {
            Budget::TokensPerDay | Budget::UsdPerDay => Period::Day,
            Budget::TokensPerMonth | Budget::UsdPerMonth => Period::Month,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Budget::TokensPerDay | Budget::TokensPerMonth => "tokens",
            Budget::UsdPerDay | Budget::UsdPerMonth => "USD",
        }
    }
}

/// A key's budgets; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
}

impl Limits {
    /// The limit of `b`, as a number comparable with [`Spent::of`].
    pub fn of(&self, b: Budget) -> Option<f64> {
        match b {
            Budget::TokensPerDay => self.tokens_per_day.map(|v| v as f64),
            Budget::TokensPerMonth => self.tokens_per_month.map(|v| v as f64),
            Budget::UsdPerDay => self.usd_per_day,
            Budget::UsdPerMonth => self.usd_per_month,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        Budget::ALL.iter().all(|b| self.of(*b).is_none())
    }
}

/// What a key spent in the current day and month.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub tokens_day: u64,
    pub tokens_month: u64,
    pub usd_day: f64,
    pub usd_month: f64,
}

impl Spent {
    pub fn of(&self, b: Budget) -> f64 {
        match b {
            Budget::TokensPerDay => self.tokens_day as f64,
            Budget::TokensPerMonth => self.tokens_month as f64,
            Budget::UsdPerDay => self.usd_day,
            Budget::UsdPerMonth => self.usd_month,
        }
    }
}

/// Why a key's request was refused: the budget, what was spent against what limit, and when
/// the period resets.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRefusal {
    pub budget: Budget,
    pub spent: f64,
    pub limit: f64,
    pub resets_at_ms: u64,
    /// Whole seconds until the reset, at least 1 (`Retry-After`).
    pub retry_after_s: u64,
}

impl BudgetRefusal {
    /// A message for people: which budget, spent vs limit, and when it resets.
    pub fn message(&self, key_prefix: &str) -> String {
        let b = self.budget;
        let (spent, limit) = match b {
            Budget::UsdPerDay | Budget::UsdPerMonth => {
                (format!("{:.6}", self.spent), format!("{:.6}", self.limit))
            }
            _ => (format!("{}", self.spent), format!("{}", self.limit)),
        };
        let day = day_of(self.resets_at_ms);
        format!(
            "key {key_prefix} is over its budget_{}: spent {spent} of {limit} {}; it resets at \
             {}T00:00:00Z (in {} s)",
            b.as_str(),
            b.unit(),
            format_day(day),
            self.retry_after_s
        )
    }
}

/// The price table: USD per million prompt and completion tokens by model, with the `"*"`
/// entry for models without their own; unpriced models are free.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices {
    table: BTreeMap<String, nearpath_config::ModelPrice>,
}

impl Prices {
    pub fn from_config(c: &nearpath_config::InferenceConfig) -> Prices {
        Prices {
            table: c.prices.clone(),
        }
    }

    /// The cost in USD of `prompt` and `completion` tokens of `model`.
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> f64 {
        let Some(p) = self.table.get(model).or_else(|| self.table.get("*")) else {
            return 0.0;
        };
        (prompt as f64 * p.prompt_usd_per_mtok + completion as f64 * p.completion_usd_per_mtok)
            / 1_000_000.0
    }
}

/// Token counts of one model in one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tokens {
    prompt: u64,
    completion: u64,
}

/// One key's spend: the current day's and the current month's tokens by model (models with
/// tokens only: a request that produced nothing adds nothing, so a client's made-up model
/// names never grow the book).
#[derive(Debug, Default)]
struct KeySpend {
    day: i64,
    by_model_day: HashMap<String, Tokens>,
    month: i64,
    by_model_month: HashMap<String, Tokens>,
}

impl KeySpend {
    /// Forgets the periods that ended before `day`.
    fn roll(&mut self, day: i64) {
        if day > self.day {
            self.day = day;
            self.by_model_day.clear();
        }
        let month = month_of_day(day);
        if month > self.month {
            self.month = month;
            self.by_model_month.clear();
        }
    }
}

/// What each API key spent this UTC day and month, in memory. Filled from the usage ledger at
/// start and by each committed usage record; read on every request.
#[derive(Debug, Default)]
pub struct SpendBook {
    keys: Mutex<HashMap<String, KeySpend>>,
}

impl SpendBook {
    /// Adds the billed tokens of a usage record of `key_id` made at `at_ms`. A record of a
    /// period that has already ended counts for nothing (a late commit across midnight goes to
    /// the day it was made, like the ledger's reports).
    pub fn add(&self, key_id: &str, model: &str, at_ms: u64, prompt: u64, completion: u64) {
        if prompt == 0 && completion == 0 {
            return;
        }
        let day = day_of(at_ms);
        let month = month_of_day(day);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let k = keys.entry(key_id.to_string()).or_default();
        k.roll(day);
        let add = |map: &mut HashMap<String, Tokens>| {
            let t = map.entry(model.to_string()).or_default();
            t.prompt = t.prompt.saturating_add(prompt);
            t.completion = t.completion.saturating_add(completion);
        };
        if k.day == day {
            add(&mut k.by_model_day);
        }
        if k.month == month {
            add(&mut k.by_model_month);
        }
    }

    /// What `key_id` spent in the day and month of `now_ms`, costed with `prices`.
    pub fn spent(&self, key_id: &str, now_ms: u64, prices: &Prices) -> Spent {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(k) = keys.get_mut(key_id) else {
            return Spent::default();
        };
        k.roll(day_of(now_ms));
        let sum = |map: &HashMap<String, Tokens>| {
            map.iter().fold((0u64, 0f64), |(tokens, usd), (model, t)| {
                (
                    tokens.saturating_add(t.prompt).saturating_add(t.completion),
                    usd + prices.cost(model, t.prompt, t.completion),
                )
            })
        };
        let (tokens_day, usd_day) = sum(&k.by_model_day);
        let (tokens_month, usd_month) = sum(&k.by_model_month);
        Spent {
            tokens_day,
            tokens_month,
            usd_day,
            usd_month,
        }
    }

    /// Refuses when `key_id` has spent its whole budget in any of `limits`' periods (spent at
    /// least the limit). The first budget exhausted in the order tokens/day, tokens/month,
    /// USD/day, USD/month is named.
    pub fn check(
        &self,
        key_id: &str,
        limits: &Limits,
        now_ms: u64,
        prices: &Prices,
    ) -> Result<(), BudgetRefusal> {
        if limits.is_unlimited() {
            return Ok(());
        }
        let spent = self.spent(key_id, now_ms, prices);
        for b in Budget::ALL {
            let Some(limit) = limits.of(b) else { continue };
            let s = spent.of(b);
            if s >= limit {
                let resets_at_ms = b.period().resets_at_ms(now_ms);
                return Err(BudgetRefusal {
                    budget: b,
                    spent: s,
                    limit,
                    resets_at_ms,
                    retry_after_s: resets_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: u32, d: u32, h: u64, min: u64) -> u64 {
        day_start_ms(days_from_civil(y, m, d)) + (h * 60 + min) * 60_000
    }

    #[test]
    fn civil_dates_round_trip_through_day_numbers() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000 is a leap year (divisible by 400), 2100 is not.
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        for day in (0..80_000).step_by(7) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        // 2026-12-06 is day 20_793.
        assert_eq!(days_from_civil(2026, 12, 6), 20_793);
    }

    #[test]
    fn a_utc_day_ends_at_midnight_utc() {
        let before = ms(2026, 3, 14, 23, 59) + 59_999;
        let after = ms(2026, 3, 15, 0, 0);
        assert_eq!(day_of(before) + 1, day_of(after));
        assert_eq!(Period::Day.resets_at_ms(before), after);
        assert_eq!(Period::Day.resets_at_ms(after), ms(2026, 3, 16, 0, 0));
    }

    #[test]
    fn december_rolls_over_into_january_of_the_next_year() {
        let dec = ms(2026, 12, 31, 23, 59);
        let jan = ms(2027, 1, 1, 0, 0);
        assert_eq!(month_of(dec) + 1, month_of(jan));
        assert_eq!(Period::Month.resets_at_ms(dec), jan);
        assert_eq!(Period::Month.resets_at_ms(jan), ms(2027, 2, 1, 0, 0));
        assert_eq!(
            first_day_of_month(month_of(jan)),
            days_from_civil(2027, 1, 1)
        );
        // February of a leap year has 29 days.
        assert_eq!(
            Period::Month.resets_at_ms(ms(2028, 2, 29, 12, 0)),
            ms(2028, 3, 1, 0, 0)
        );
    }

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(parse_day("2026-12-06"), Some(20_793));
        assert_eq!(format_day(20_793), "2026-12-06");
        for bad in [
            "2026-2-06",
            "2026-02-30",
            "2023-02-29",
            "2026-13-01",
            "2026-00-10",
            "1969-12-31",
            "+026-12-06",
            "2026-12-0٣",
            "",
            "20261206",
            "2026-12-06T00",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    fn prices() -> Prices {
        let mut c = nearpath_config::InferenceConfig::default();
        c.prices.insert(
            "big".into(),
            nearpath_config::ModelPrice {
                prompt_usd_per_mtok: 1.0,
                completion_usd_per_mtok: 3.0,
            },
        );
        c.prices.insert(
            "*".into(),
            nearpath_config::ModelPrice {
                prompt_usd_per_mtok: 0.0,
                completion_usd_per_mtok: 1.0,
            },
        );
        Prices::from_config(&c)
    }

    #[test]
    fn prices_use_the_model_entry_then_the_default_and_are_free_without_either() {
        let p = prices();
        assert_eq!(p.cost("big", 1_000_000, 1_000_000), 4.0);
        assert_eq!(p.cost("other", 1_000_000, 2_000_000), 2.0);
        assert_eq!(Prices::default().cost("big", 1_000_000, 1_000_000), 0.0);
    }

    #[test]
    fn spend_counts_the_current_day_and_month_and_forgets_ended_periods() {
        let book = SpendBook::default();
        let p = prices();
        let d1 = ms(2026, 12, 31, 10, 0);
        book.add("k", "big", d1, 100, 200);
        book.add("k", "small", d1, 0, 50);
        // Nothing tokens, nothing added (not even the made-up model).
        book.add("k", "made-up", d1, 0, 0);
        let s = book.spent("k", d1, &p);
        assert_eq!((s.tokens_day, s.tokens_month), (350, 350));
        assert!((s.usd_day - (100.0 + 600.0 + 50.0) / 1e6).abs() < 1e-12);
        // New Year's Day ends both the day and the month.
        let jan = ms(2027, 1, 1, 0, 0);
        assert_eq!(book.spent("k", jan, &p), Spent::default());
        // A record made before the roll, committed after it, counts for nothing.
        book.add("k", "big", d1, 1, 1);
        assert_eq!(book.spent("k", jan, &p), Spent::default());
        book.add("k", "big", jan, 5, 5);
        let next_day = ms(2027, 1, 2, 0, 0);
        let s = book.spent("k", next_day, &p);
        assert_eq!((s.tokens_day, s.tokens_month), (0, 10));
        assert_eq!(book.spent("other-key", next_day, &p), Spent::default());
    }

    #[test]
    fn a_key_at_its_budget_is_refused_with_the_budget_and_the_wait_until_the_reset() {
        let book = SpendBook::default();
        let p = prices();
        let now = ms(2026, 12, 31, 23, 0);
        let limits = Limits {
            tokens_per_day: Some(1_000),
            usd_per_month: Some(0.001),
            ..Default::default()
        };
        assert!(book.check("k", &limits, now, &p).is_ok());
        book.add("k", "big", now, 0, 300);
        // 300 tokens, 0.0009 USD: under both.
        assert!(book.check("k", &limits, now, &p).is_ok());
        book.add("k", "cheap", now, 0, 100);
        // 400 tokens, 0.0009 + 0.0001 = 0.001 USD: the month's USD budget is spent.
        let r = book.check("k", &limits, now, &p).unwrap_err();
        assert_eq!(r.budget, Budget::UsdPerMonth);
        assert_eq!(r.resets_at_ms, ms(2027, 1, 1, 0, 0));
        assert_eq!(r.retry_after_s, 3600);
        let msg = r.message("npk_ab");
        assert!(msg.contains("budget_usd_per_month"), "{msg}");
        assert!(msg.contains("2027-01-01T00:00:00Z"), "{msg}");
        book.add("k", "cheap", now, 0, 600);
        // The day's tokens are named first.
        let r = book.check("k", &limits, now, &p).unwrap_err();
        assert_eq!(
            (r.budget, r.spent, r.limit),
            (Budget::TokensPerDay, 1000.0, 1000.0)
        );
        assert_eq!(r.retry_after_s, 3600);
        // A budget of zero refuses from the start.
        let zero = Limits {
            tokens_per_month: Some(0),
            ..Default::default()
        };
        assert_eq!(
            book.check("fresh", &zero, now, &p).unwrap_err().budget,
            Budget::TokensPerMonth
        );
        assert!(book.check("k", &Limits::default(), now, &p).is_ok());
    }
}
