//! SQL for the catalog. Portable between SQLite and PostgreSQL (see shopmesh-db); every query
//! is a static string; the product lists' are assembled once from fixed fragments
//! (`build_list_sql`), and search uses an index each backend builds its own way.

use std::sync::LazyLock;

use shopmesh_db::{Backend, Db};
use shopmesh_db::{is_unique_violation, micros};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{
    Category, Currency, Description, ImageUrl, Price, Product, ProductDraft, ProductName, Sku, Sort,
};
use crate::error::Error;

/// The catalog database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

#[derive(sqlx::FromRow)]
struct ProductRow {
    id: String,
    sku: String,
    name: String,
    description: String,
    price: i64,
    currency: String,
    category: String,
    image_url: Option<String>,
    active: i64,
    created_at: i64,
    updated_at: i64,
    deleted_at: Option<i64>,
    available: Option<i64>,
}

macro_rules! product_columns {
    () => {
        "id, sku, name, description, price, currency, category, image_url, active, created_at, \
         updated_at, deleted_at, \
         (SELECT available FROM availability WHERE availability.product_id = products.id) \
         AS available"
    };
}

/// How a list query finds its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    /// No search text.
    None,
    /// The sort order walked, each row tested with `LIKE` (PostgreSQL, whose planner uses the
    /// trigram indexes when they pay; SQLite below three characters, which no trigram finds).
    Like,
    /// SQLite: the matching products found in the trigram index (`products_search`,
    /// migrations/sqlite) and joined in that order (`CROSS JOIN` keeps SQLite from turning the
    /// join around into a walk of the sort index), then sorted; the `LIKE` still decides, so
    /// both plans return the same rows. Its cost grows with the number of matches, not with
    /// the size of the catalogue (bench/search.sh).
    Indexed,
}

/// The SQL of one list query, built from fixed fragments (nothing from the request is
/// spliced in; values are bound), with only the conditions it needs: a condition written
/// for every case (`$1 = '' OR category = $1`, `$3 = 0 OR name > $4 ...`) cannot use an
/// index, so a category or a deep page walked the catalogue from its start (issue 9). The
/// keyset is a row value, `(name, id) > ($4, $5)`, which both backends seek in the
/// `(…, name, id)` and `(…, price, id)` indexes. Placeholders are numbered in the order
/// [`Store::list`] binds: search phrase, category, pattern, last key, last id, limit.
fn build_list_sql(sort: Sort, category: bool, search: Search, after: bool) -> String {
    let (key, cmp, dir) = match sort {
        Sort::NameAsc => ("name", ">", "ASC"),
        Sort::NameDesc => ("name", "<", "DESC"),
        Sort::PriceAsc => ("price", ">", "ASC"),
        Sort::PriceDesc => ("price", "<", "DESC"),
    };
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    let mut sql = String::new();
    if search == Search::Indexed {
        // The matches are looked up once; beyond the limit the page is left empty unsorted
        // and `Store::list` walks the sort order instead.
        sql += &format!(
            "WITH hits AS MATERIALIZED (SELECT rowid AS hit FROM products_search \
             WHERE products_search MATCH {} LIMIT {}) SELECT {} \
             FROM hits CROSS JOIN products ON products.rowid = hits.hit \
             WHERE (SELECT COUNT(*) FROM hits) <= {INDEXED_SEARCH_MAX_HITS} AND",
            next(),
            INDEXED_SEARCH_MAX_HITS + 1,
            product_columns!()
        );
    } else {
        sql += &format!("SELECT {} FROM products WHERE", product_columns!());
    }
    sql += " deleted_at IS NULL AND active = 1";
    if category {
        sql += &format!(" AND category = {}", next());
    }
    if search != Search::None {
        let pattern = next();
        sql += &format!(
            " AND (lower(name) LIKE {pattern} ESCAPE '\\' \
             OR lower(description) LIKE {pattern} ESCAPE '\\')"
        );
    }
    if after {
        let (last_key, last_id) = (next(), next());
        sql += &format!(" AND ({key}, id) {cmp} ({last_key}, {last_id})");
    }
    sql += &format!(" ORDER BY {key} {dir}, id {dir} LIMIT {}", next());
    sql
}

/// On SQLite, search text in more products than this walks the sort order instead of sorting
/// every match: 40,000 matches sort in about 30 ms, while text that common is dense enough in
/// the order for a walk to fill a page soon (unless its matches cluster far down the order;
/// bench/README.md, "A million products").
/// (Two in this crate's unit tests, so that they reach the walk with three products.)
const INDEXED_SEARCH_MAX_HITS: i64 = if cfg!(test) { 2 } else { 50_000 };

/// Every list query's SQL, assembled once: sort × category × search × first page or not.
static LIST_SQL: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut all = Vec::with_capacity(48);
    for sort in [
        Sort::NameAsc,
        Sort::NameDesc,
        Sort::PriceAsc,
        Sort::PriceDesc,
    ] {
        for category in [false, true] {
            for search in [Search::None, Search::Like, Search::Indexed] {
                for after in [false, true] {
                    all.push(build_list_sql(sort, category, search, after));
                }
            }
        }
    }
    all
});

/// The SQL of one list query (see [`build_list_sql`]).
fn list_sql(sort: Sort, category: bool, search: Search, after: bool) -> &'static str {
    let index = ((sort as usize * 2 + usize::from(category)) * 3 + search as usize) * 2
        + usize::from(after);
    &LIST_SQL[index]
}

/// Where the previous page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// The last name and id seen (name sorts).
    Name(String, Uuid),
    /// The last price and id seen (price sorts).
    Price(i64, Uuid),
}

/// A product list query.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Only this category.
    pub category: Option<Category>,
    /// Words that must appear in the name or description (case-insensitive).
    pub q: Option<String>,
    /// Order.
    pub sort: Sort,
    /// Keyset position.
    pub after: Option<After>,
    /// Rows to fetch.
    pub limit: u32,
}

fn from_micros(us: i64) -> Result<OffsetDateTime, Error> {
    shopmesh_db::from_micros(us)
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("stored timestamp out of range")))
}

/// The search text as an FTS5 query for the trigram index: each word of three characters or
/// more as a phrase (double quotes doubled), all of them required. A trigram phrase matches
/// its text as a substring, case-insensitively, so every product that contains the whole text
/// matches; the `LIKE` then keeps those that contain it as typed. Words rather than the whole
/// text because a long phrase makes SQLite check the positions of every trigram in it (twice
/// the time at a million products, bench/search.sh). `None` when no word is long enough for a
/// trigram.
/// Lowercased as the `LIKE` pattern is (FTS5 folds case its own way, which for some letters,
/// `İ` for one, is not Rust's); words with control characters are left to the `LIKE` (FTS5
/// reads a NUL as the end of the query).
fn trigram_query(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .to_lowercase()
        .split_whitespace()
        .filter(|word| word.chars().count() >= 3 && !word.chars().any(char::is_control))
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" AND "))
}

/// `%word%`, with LIKE's wildcards in the user's text escaped.
fn like_pattern(q: &str) -> String {
    let mut pattern = String::from("%");
    for c in q.trim().to_lowercase().chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

impl ProductRow {
    fn into_product(self) -> Result<Product, Error> {
        let corrupt =
            |what: &str| Error::Internal(anyhow::anyhow!("stored product has a bad {what}"));
        Ok(Product {
            id: Uuid::parse_str(&self.id).map_err(|_| corrupt("id"))?,
            draft: ProductDraft {
                sku: Sku::parse(&self.sku).map_err(|_| corrupt("sku"))?,
                name: ProductName::parse(&self.name).map_err(|_| corrupt("name"))?,
                description: Description::parse(&self.description)
                    .map_err(|_| corrupt("description"))?,
                price: Price::parse(self.price).map_err(|_| corrupt("price"))?,
                currency: Currency::parse(&self.currency).map_err(|_| corrupt("currency"))?,
                category: Category::parse(&self.category).map_err(|_| corrupt("category"))?,
                image_url: self
                    .image_url
                    .as_deref()
                    .map(ImageUrl::parse)
                    .transpose()
                    .map_err(|_| corrupt("image_url"))?,
                active: self.active != 0,
            },
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            deleted: self.deleted_at.is_some(),
            available: self.available,
        })
    }
}

impl Store {
    /// A store over this database.
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores a new product with this id; [`Error::SkuTaken`] if the SKU is used.
    pub async fn insert(&self, id: Uuid, draft: &ProductDraft) -> Result<Product, Error> {
        let now = micros(OffsetDateTime::now_utc());
        let result = sqlx::query(
            "INSERT INTO products (id, sku, name, description, price, currency, category, \
             image_url, active, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
        )
        .bind(id.hyphenated().to_string())
        .bind(draft.sku.as_str())
        .bind(draft.name.as_str())
        .bind(draft.description.as_str())
        .bind(draft.price.minor())
        .bind(draft.currency.as_str())
        .bind(draft.category.as_str())
        .bind(draft.image_url.as_ref().map(|u| u.as_str().to_owned()))
        .bind(i64::from(draft.active))
        .bind(now)
        .execute(self.db.pool())
        .await;
        match result {
            Ok(_) => Ok(Product {
                id,
                draft: draft.clone(),
                created_at: from_micros(now)?,
                updated_at: from_micros(now)?,
                deleted: false,
                available: None,
            }),
            Err(e) if is_unique_violation(&e) => Err(Error::SkuTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// Inserts the products that are not there yet (by id or SKU); returns how many were new.
    pub async fn insert_missing(&self, products: &[(Uuid, ProductDraft)]) -> Result<u64, Error> {
        let now = micros(OffsetDateTime::now_utc());
        let mut tx = self.db.begin_write().await?;
        let mut added = 0;
        for (id, draft) in products {
            added += sqlx::query(
                "INSERT INTO products (id, sku, name, description, price, currency, category, \
                 image_url, active, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) ON CONFLICT DO NOTHING",
            )
            .bind(id.hyphenated().to_string())
            .bind(draft.sku.as_str())
            .bind(draft.name.as_str())
            .bind(draft.description.as_str())
            .bind(draft.price.minor())
            .bind(draft.currency.as_str())
            .bind(draft.category.as_str())
            .bind(draft.image_url.as_ref().map(|u| u.as_str().to_owned()))
            .bind(i64::from(draft.active))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(added)
    }

    /// One product, unless deleted.
    pub async fn get(&self, id: Uuid) -> Result<Option<Product>, Error> {
        let row: Option<ProductRow> = sqlx::query_as(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id.hyphenated().to_string())
        .fetch_optional(self.db.reader())
        .await?;
        row.map(ProductRow::into_product).transpose()
    }

    /// Products on sale matching the query, one page (fetch `limit + 1` to learn if more exist).
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<Product>, Error> {
        let pattern = query
            .q
            .as_deref()
            .filter(|q| !q.trim().is_empty())
            .map(like_pattern);
        let phrase = match self.db.backend() {
            Backend::Sqlite => query.q.as_deref().and_then(trigram_query),
            // PostgreSQL's planner chooses between the trigram indexes and the sort order.
            Backend::Postgres => None,
        };
        let search = match (&pattern, &phrase) {
            (None, _) => Search::None,
            (Some(_), Some(_)) => Search::Indexed,
            (Some(_), None) => Search::Like,
        };
        let mut rows = self
            .page(query, search, phrase.as_deref(), pattern.as_deref())
            .await?;
        if let (Search::Indexed, Some(phrase), true) = (search, &phrase, rows.is_empty()) {
            // An empty page: no match, or text in so much of the catalogue ("and" is in most
            // descriptions) that the indexed query declined to sort it; the sort order finds
            // a page of such text soon.
            let (hits,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM (SELECT 1 FROM products_search \
                 WHERE products_search MATCH $1 LIMIT $2)",
            )
            .bind(phrase)
            .bind(INDEXED_SEARCH_MAX_HITS + 1)
            .fetch_one(self.db.long_reader())
            .await?;
            if hits > INDEXED_SEARCH_MAX_HITS {
                rows = self
                    .page(query, Search::Like, None, pattern.as_deref())
                    .await?;
            }
        }
        rows.into_iter().map(ProductRow::into_product).collect()
    }

    async fn page(
        &self,
        query: &ListQuery,
        search: Search,
        phrase: Option<&str>,
        pattern: Option<&str>,
    ) -> Result<Vec<ProductRow>, Error> {
        let sql = list_sql(
            query.sort,
            query.category.is_some(),
            search,
            query.after.is_some(),
        );
        let mut q = sqlx::query_as::<_, ProductRow>(sql);
        if let (Search::Indexed, Some(phrase)) = (search, phrase) {
            q = q.bind(phrase.to_owned());
        }
        if let Some(category) = &query.category {
            q = q.bind(category.as_str().to_owned());
        }
        if let Some(pattern) = pattern {
            q = q.bind(pattern.to_owned());
        }
        q = match (&query.after, query.sort) {
            (None, _) => q,
            (Some(After::Name(name, id)), Sort::NameAsc | Sort::NameDesc) => {
                q.bind(name.clone()).bind(id.hyphenated().to_string())
            }
            (Some(After::Price(price, id)), Sort::PriceAsc | Sort::PriceDesc) => {
                q.bind(*price).bind(id.hyphenated().to_string())
            }
            (Some(_), _) => return Err(Error::BadCursor),
        };
        // A page may scan (a search over a large catalogue): on a reader thread of its own.
        Ok(q.bind(i64::from(query.limit))
            .fetch_all(self.db.long_reader())
            .await?)
    }

    /// Replaces what an admin set on a live product; `None` if there is none.
    pub async fn update(&self, id: Uuid, draft: &ProductDraft) -> Result<Option<Product>, Error> {
        let result = sqlx::query(
            "UPDATE products SET sku = $1, name = $2, description = $3, price = $4, \
             currency = $5, category = $6, image_url = $7, active = $8, updated_at = $9 \
             WHERE id = $10 AND deleted_at IS NULL",
        )
        .bind(draft.sku.as_str())
        .bind(draft.name.as_str())
        .bind(draft.description.as_str())
        .bind(draft.price.minor())
        .bind(draft.currency.as_str())
        .bind(draft.category.as_str())
        .bind(draft.image_url.as_ref().map(|u| u.as_str().to_owned()))
        .bind(i64::from(draft.active))
        .bind(micros(OffsetDateTime::now_utc()))
        .bind(id.hyphenated().to_string())
        .execute(self.db.pool())
        .await;
        match result {
            Ok(done) if done.rows_affected() == 0 => Ok(None),
            Ok(_) => self.get(id).await,
            Err(e) if is_unique_violation(&e) => Err(Error::SkuTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a product (softly: past orders still name it); `false` if there was none.
    pub async fn delete(&self, id: Uuid) -> Result<bool, Error> {
        let now = micros(OffsetDateTime::now_utc());
        let done = sqlx::query(
            "UPDATE products SET deleted_at = $1, updated_at = $1 \
             WHERE id = $2 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(id.hyphenated().to_string())
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The products with these ids, deleted ones included (they are not purchasable).
    ///
    /// One static query per id: `QueryBuilder`'s `IN (...)` emits `?`
    /// placeholders under `sqlx::Any`, which PostgreSQL rejects, and callers ask for a handful
    /// of ids (the lines of an order, at most 100).
    pub async fn by_ids(&self, ids: &[Uuid]) -> Result<Vec<Product>, Error> {
        let mut products = Vec::with_capacity(ids.len());
        for id in ids {
            let row: Option<ProductRow> = sqlx::query_as(concat!(
                "SELECT ",
                product_columns!(),
                " FROM products WHERE id = $1"
            ))
            .bind(id.hyphenated().to_string())
            .fetch_optional(self.db.reader())
            .await?;
            if let Some(row) = row {
                products.push(row.into_product()?);
            }
        }
        Ok(products)
    }
}

#[cfg(test)]
mod tests {
    use super::{Search, Sort, like_pattern, list_sql, trigram_query};

    #[tokio::test]
    async fn search_text_in_more_products_than_the_index_sorts_walks_the_order_instead() {
        use crate::domain::{
            Category, Currency, Description, Price, ProductDraft, ProductName, Sku,
        };
        let test_db = shopmesh_db::testing::TestDb::sqlite();
        let db = shopmesh_db::Db::connect(test_db.url(), &Default::default())
            .await
            .expect("connect");
        crate::migrate(&db).await.expect("migrate");
        let store = super::Store::new(db);
        for (sku, name) in [
            ("L1", "Desk Lamp"),
            ("L2", "Floor Lamp"),
            ("L3", "Lamp Shade"),
            ("C1", "Wall Clock"),
        ] {
            let draft = ProductDraft {
                sku: Sku::parse(sku).expect("sku"),
                name: ProductName::parse(name).expect("name"),
                description: Description::parse("For the home").expect("description"),
                price: Price::parse(1000).expect("price"),
                currency: Currency::parse("EUR").expect("currency"),
                category: Category::parse("home").expect("category"),
                image_url: None,
                active: true,
            };
            store
                .insert(uuid::Uuid::now_v7(), &draft)
                .await
                .expect("insert");
        }
        let names = |q: &str, limit: u32| {
            let store = store.clone();
            let query = super::ListQuery {
                category: None,
                q: Some(q.to_owned()),
                sort: Sort::NameAsc,
                after: None,
                limit,
            };
            async move {
                let rows = store.list(&query).await.expect("list");
                rows.into_iter()
                    .map(|p| p.draft.name.as_str().to_owned())
                    .collect::<Vec<_>>()
            }
        };
        // Three lamps: more than the index sorts here (two), so the list is walked.
        assert_eq!(
            names("lamp", 10).await,
            ["Desk Lamp", "Floor Lamp", "Lamp Shade"]
        );
        assert_eq!(names("LAMP", 2).await, ["Desk Lamp", "Floor Lamp"]);
        // One clock, none of a thing: from the index.
        assert_eq!(names("clock", 10).await, ["Wall Clock"]);
        assert!(names("chair", 10).await.is_empty());
    }

    #[test]
    fn each_list_query_has_its_own_conditions_numbered_in_bind_order() {
        let all = list_sql(Sort::PriceDesc, true, Search::Indexed, true);
        for part in [
            "MATCH $1",
            "category = $2",
            "lower(name) LIKE $3",
            "(price, id) < ($4, $5)",
            "ORDER BY price DESC, id DESC LIMIT $6",
        ] {
            assert!(all.contains(part), "{part} in {all}");
        }
        let first_page = list_sql(Sort::NameAsc, false, Search::None, false);
        assert!(
            first_page.ends_with("ORDER BY name ASC, id ASC LIMIT $1"),
            "{first_page}"
        );
        assert!(!first_page.contains("LIKE") && !first_page.contains("category ="));
        let like = list_sql(Sort::NameDesc, false, Search::Like, true);
        assert!(
            like.contains("LIKE $1") && like.contains("(name, id) < ($2, $3)"),
            "{like}"
        );
        assert!(!like.contains("MATCH"));
    }

    #[test]
    fn like_wildcards_in_the_search_text_are_escaped() {
        assert_eq!(like_pattern(" Knife "), "%knife%");
        assert_eq!(like_pattern("100%_a\\b"), "%100\\%\\_a\\\\b%");
    }

    #[test]
    fn search_text_becomes_required_trigram_phrases_of_its_long_words() {
        assert_eq!(trigram_query("walnut"), Some(r#""walnut""#.to_owned()));
        assert_eq!(
            trigram_query(" a Walnut  lamp "),
            Some(r#""walnut" AND "lamp""#.to_owned())
        );
        assert_eq!(trigram_query("abc\0def lamp"), Some(r#""lamp""#.to_owned()));
        // Quotes cannot end the phrase early; FTS5's operators inside it are plain text.
        assert_eq!(
            trigram_query(r#"abc" NEAR xyz"#),
            Some(r#""abc""" AND "near" AND "xyz""#.to_owned())
        );
        assert_eq!(trigram_query("ab c"), None, "no word a trigram can find");
    }
}
