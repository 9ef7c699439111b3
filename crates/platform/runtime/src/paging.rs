//! List pages: `{"items": [...], "next_cursor": ...}` with a bounded `limit`.
//!
//! Lists page by keyset (a cursor naming the last item seen), never by offset: a page stays
//! correct while rows are added, and a deep page costs what the first one does.

use serde::Serialize;
use shopmesh_problem::{Kind, Problem};

/// Items per page when the client does not say.
pub const DEFAULT_LIMIT: u32 = 20;
/// Most items per page.
pub const MAX_LIMIT: u32 = 100;

/// One page of a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// The page size a client asked for, checked: 1 to 100, 20 by default.
pub fn limit(requested: Option<u32>) -> Result<u32, Problem> {
    match requested.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        _ => Err(
            Problem::new(Kind::BadRequest, "invalid_limit", "Invalid limit")
                .with_field("limit")
                .with_detail(format!("limit must be between 1 and {MAX_LIMIT}")),
        ),
    }
}

impl<T> Page<T> {
    /// A page from `rows` fetched with `limit + 1`: the extra row only says there is more.
    pub fn from_rows(mut rows: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Page<T> {
        let limit = limit as usize;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(cursor_of)
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }

    /// The same page with each item converted.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_bounded_and_default_to_twenty() {
        assert_eq!(limit(None).expect("default"), 20);
        assert_eq!(limit(Some(100)).expect("max"), 100);
        assert_eq!(limit(Some(0)).expect_err("zero").field(), Some("limit"));
        assert!(limit(Some(101)).is_err());
    }

    #[test]
    fn the_extra_row_becomes_the_cursor_of_the_last_item_kept() {
        let page = Page::from_rows(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!(page.items, [1, 2]);
        assert_eq!(page.next_cursor.as_deref(), Some("2"));
        let last = Page::from_rows(vec![1, 2], 2, |n| n.to_string());
        assert_eq!(last.next_cursor, None);
    }
}
