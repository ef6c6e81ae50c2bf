//! Topic trie micro-benchmarks: `halyard_core::LocalRouter::route` with 100,000 filters, a
//! realistic share of them with `+` and `#` wildcards.
//!
//! Run with `cargo bench -p halyard-bench --features micro --bench trie`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use halyard_codec::SubscriptionOptions;
use halyard_core::{FilterRef, LocalRouter, RouteMatch, Router, SubscriptionEntry};

const FILTERS: u64 = 100_000;

/// A deterministic xorshift generator, so every run benchmarks the same trie.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Filters shaped like `site/{s}/dev/{d}/{metric}` with wildcards mixed in:
/// ~80% exact, ~10% `+` at one level, ~5% `#` tails, ~5% `+` plus `#`.
fn filters() -> Vec<String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..FILTERS)
        .map(|i| {
            let site = rng.next() % 100;
            let dev = i % 1000;
            let metric = ["temp", "hum", "power", "state"][(rng.next() % 4) as usize];
            match rng.next() % 20 {
                0 | 1 => format!("site/{site}/dev/+/{metric}"),
                2 => format!("site/{site}/dev/{dev}/#"),
                3 => format!("site/+/dev/{dev}/#"),
                _ => format!("site/{site}/dev/{dev}/{metric}"),
            }
        })
        .collect()
}

fn router() -> LocalRouter {
    let mut router = LocalRouter::new();
    for (session, filter) in filters().iter().enumerate() {
        router.subscribe(
            session as u64,
            FilterRef::parse(filter),
            SubscriptionEntry {
                options: SubscriptionOptions::default(),
                identifier: None,
            },
        );
    }
    router
}

fn trie(c: &mut Criterion) {
    let mut router = router();
    let topics: Vec<String> = {
        let mut rng = Rng(42);
        let metrics = ["temp", "hum", "power", "state"];
        (0..1024)
            .map(|_| {
                format!(
                    "site/{}/dev/{}/{}",
                    rng.next() % 100,
                    rng.next() % 1000,
                    metrics[(rng.next() % 4) as usize]
                )
            })
            .collect()
    };
    let mut out: Vec<RouteMatch> = Vec::with_capacity(1024);
    let mut group = c.benchmark_group("trie_100k_filters");
    group.bench_function("route", |b| {
        let mut i = 0;
        b.iter(|| {
            out.clear();
            router.route(black_box(&topics[i % topics.len()]), &|_| true, &mut out);
            i += 1;
            black_box(out.len())
        })
    });
    group.bench_function("route_miss", |b| {
        b.iter(|| {
            out.clear();
            router.route(black_box("other/1/dev/2/temp"), &|_| true, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("subscribe_unsubscribe", |b| {
        let mut i = 0u64;
        b.iter(|| {
            let filter = format!("site/{}/dev/+/extra", i % 100);
            let session = FILTERS + i;
            router.subscribe(
                session,
                FilterRef::parse(&filter),
                SubscriptionEntry {
                    options: SubscriptionOptions::default(),
                    identifier: None,
                },
            );
            router.unsubscribe(session, FilterRef::parse(&filter));
            i += 1;
        })
    });
    group.finish();
}

criterion_group!(benches, trie);
criterion_main!(benches);
