//! The catalog's recent answers: an order of products priced a moment ago is priced again
//! from memory instead of by a call to the catalog.
//!
//! That call was one of a purchase's six hops between processes and most of the catalog's
//! CPU under the purchase load (issue 9, bench/README): with the products of recent orders
//! kept `orders.price_cache_ms` (a second by default), the catalog's CPU per journey fell by
//! two thirds. The cost: whatever an admin changes about a product (its price, name or
//! currency, taking it off sale or putting it back) reaches new orders up to that long after
//! the catalog's pages show it (the gateway drops its cached pages at an admin's change); an
//! order refused meanwhile as unavailable keeps that answer for its `Idempotency-Key`. What
//! holds regardless: an order shows the prices it stored before it is paid and charges
//! exactly those, and the inventory still reserves every unit.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shopmesh_proto::catalog::v1::Product;
use tokio::time::Instant;

/// Products as the catalog last described them, each for `fresh_for`.
#[derive(Debug)]
pub struct PriceCache {
    fresh_for: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Instant, Product)>>,
}

impl PriceCache {
    /// Keeps answers `fresh_for` (zero: never), at most `capacity` products at a time.
    pub fn new(fresh_for: Duration, capacity: usize) -> Self {
        PriceCache {
            fresh_for,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The map; nothing that holds it can leave an entry half-written (entries are
    /// independent), so a panic elsewhere while holding it does not turn the cache off.
    fn entries(&self) -> MutexGuard<'_, HashMap<String, (Instant, Product)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every one of `ids` (hyphenated), if each was described within `fresh_for`; `None`
    /// otherwise (the caller asks the catalog for all of them).
    pub fn get_all(&self, ids: &[String]) -> Option<Vec<Product>> {
        if self.fresh_for.is_zero() || ids.is_empty() {
            return None;
        }
        let now = Instant::now();
        let entries = self.entries();
        ids.iter()
            .map(|id| {
                entries
                    .get(id)
                    .filter(|(at, _)| now.saturating_duration_since(*at) < self.fresh_for)
                    .map(|(_, product)| product.clone())
            })
            .collect()
    }

    /// Keeps what the catalog answered to a call made at `asked`, each product as of then
    /// (so it goes stale `fresh_for` after the question, however long the answer took); an
    /// answer to an earlier question never replaces a later one's. Full, it drops what is
    /// stale, and everything if that leaves it over three quarters full: a burst of distinct products
    /// costs calls, never memory, nor a scan per product.
    pub fn keep(&self, asked: Instant, products: &[Product]) {
        if self.fresh_for.is_zero() || self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries();
        for product in products {
            match entries.get(&product.id) {
                Some((at, _)) if *at > asked => continue,
                Some(_) => {}
                None if entries.len() >= self.capacity => {
                    entries
                        .retain(|_, (at, _)| now.saturating_duration_since(*at) < self.fresh_for);
                    if entries.len() >= self.capacity - self.capacity / 4 {
                        entries.clear();
                    }
                }
                None => {}
            }
            entries.insert(product.id.clone(), (asked, product.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(id: &str, price: i64) -> Product {
        Product {
            id: id.to_owned(),
            sku: format!("SKU-{id}"),
            name: format!("Product {id}"),
            price,
            currency: "EUR".to_owned(),
            purchasable: true,
            ..Product::default()
        }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_reused_while_fresh_and_only_whole() {
        let cache = PriceCache::new(Duration::from_secs(1), 100);
        assert_eq!(cache.get_all(&ids(&["a"])), None, "nothing kept yet");
        cache.keep(Instant::now(), &[product("a", 100), product("b", 200)]);
        let both = cache.get_all(&ids(&["b", "a"])).expect("both fresh");
        assert_eq!(
            both.iter().map(|p| p.price).collect::<Vec<_>>(),
            [200, 100],
            "in the order asked"
        );
        assert_eq!(
            cache.get_all(&ids(&["a", "c"])),
            None,
            "one unknown product: ask the catalog for all"
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(cache.get_all(&ids(&["a"])).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cache.get_all(&ids(&["a"])), None, "a second old: stale");
        cache.keep(Instant::now(), &[product("a", 150)]);
        assert_eq!(
            cache.get_all(&ids(&["a"])).expect("fresh again")[0].price,
            150
        );
    }

    #[tokio::test(start_paused = true)]
    async fn it_stays_within_its_capacity() {
        let cache = PriceCache::new(Duration::from_secs(1), 3);
        cache.keep(Instant::now(), &[product("a", 1), product("b", 2)]);
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.keep(Instant::now(), &[product("c", 3), product("d", 4)]);
        // The stale two made room.
        assert_eq!(cache.entries().len(), 2);
        cache.keep(Instant::now(), &[product("e", 5), product("f", 6)]);
        let kept = cache.entries().len();
        assert!(kept <= 3, "{kept} kept of at most 3");
        assert!(cache.get_all(&ids(&["f"])).is_some(), "the newest is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_to_an_earlier_question_does_not_replace_a_newer_one() {
        let cache = PriceCache::new(Duration::from_secs(1), 100);
        let earlier = Instant::now();
        tokio::time::advance(Duration::from_millis(300)).await;
        cache.keep(Instant::now(), &[product("a", 800)]);
        // The answer to the question asked 300 ms ago arrives now, with the old price.
        cache.keep(earlier, &[product("a", 500), product("b", 2)]);
        assert_eq!(cache.get_all(&ids(&["a"])).expect("fresh")[0].price, 800);
        // And what it did bring goes stale a second after it was asked.
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(cache.get_all(&ids(&["b"])), None);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_keeps_nothing() {
        let cache = PriceCache::new(Duration::ZERO, 100);
        cache.keep(Instant::now(), &[product("a", 1)]);
        assert_eq!(cache.get_all(&ids(&["a"])), None);
    }
}
