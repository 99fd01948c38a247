-- First-stage retrieval signals next to the memories (issue: hybrid candidates).
--
-- Lexical: Postgres parses every document once (english stemmer and stop words) into a generated tsvector
-- column with a GIN index. Ranking is BM25 rather than ts_rank_cd: ts_rank_cd has no inverse document frequency,
-- so a question's common words ("born", "city") weigh as much as its rare names; BM25 needs per-term document
-- frequencies and document lengths, which we compute once per corpus version from the tsvectors themselves
-- (lexical_corpora / lexical_terms / lexical_postings) when the first build of that corpus version is published.
ALTER TABLE documents ADD COLUMN tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('english', title || E'\n' || body)) STORED;
CREATE INDEX documents_tsv ON documents USING gin (tsv);

-- One row once a corpus version's lexical statistics are complete (written in the same transaction as them).
CREATE TABLE lexical_corpora (
    corpus_version text PRIMARY KEY,
    n_docs         bigint NOT NULL,
    avg_len        double precision NOT NULL,
    k1             double precision NOT NULL,
    b              double precision NOT NULL
);
-- idf per lexeme: ln(1 + (N - df + 0.5) / (df + 0.5)), the non-negative BM25 idf.
CREATE TABLE lexical_terms (
    corpus_version text NOT NULL,
    lexeme         text NOT NULL,
    df             integer NOT NULL,
    idf            real NOT NULL,
    PRIMARY KEY (corpus_version, lexeme)
);
-- The BM25 term weight of a lexeme in a document, tf·(k1+1) / (tf + k1·(1 − b + b·len/avg_len)), precomputed so
-- that a query is one indexed join and a sum.
CREATE TABLE lexical_postings (
    corpus_version text NOT NULL,
    lexeme         text NOT NULL,
    doc_id         text NOT NULL,
    w              real NOT NULL,
    PRIMARY KEY (corpus_version, lexeme, doc_id)
);

-- Dense: one sentence embedding per document of a build (loaded in the same COPY as its memory), with a partial
-- HNSW index per build created at publish like the memory ANN index. NULL for builds made without one.
ALTER TABLE index_builds ADD COLUMN dense_model text;
ALTER TABLE index_builds ADD COLUMN dense_dim integer CHECK (dense_dim IS NULL OR dense_dim BETWEEN 1 AND 2000);
ALTER TABLE memories ADD COLUMN dense vector;
