-- SQLite only (the portable migrations are in the folder above). Search text is matched as a
-- case-insensitive substring of a product's name or description; without an index that is a
-- scan of every product. FTS5's trigram tokenizer indexes every three-character substring, so
-- a query of three characters or more finds its candidates in the index (issue 9). The index
-- is "external content": it keeps no copy of the text, the triggers keep it in step with
-- `products`, and the rowid ties the two.
CREATE VIRTUAL TABLE products_search USING fts5(
    name, description, content = 'products', content_rowid = 'rowid', tokenize = 'trigram'
);

CREATE TRIGGER products_search_insert AFTER INSERT ON products BEGIN
    INSERT INTO products_search (rowid, name, description)
    VALUES (new.rowid, new.name, new.description);
END;

CREATE TRIGGER products_search_delete AFTER DELETE ON products BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.rowid, old.name, old.description);
END;

CREATE TRIGGER products_search_update AFTER UPDATE OF name, description ON products BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.rowid, old.name, old.description);
    INSERT INTO products_search (rowid, name, description)
    VALUES (new.rowid, new.name, new.description);
END;

-- Products that existed before this migration.
INSERT INTO products_search (products_search) VALUES ('rebuild');
