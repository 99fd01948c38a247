-- Documents, index builds and per-build compressed memories.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE documents (
    corpus_version text NOT NULL,
    doc_id         text NOT NULL,
    title          text NOT NULL DEFAULT '',
    body           text NOT NULL,
    PRIMARY KEY (corpus_version, doc_id)
);

-- One build = (model, compression rate, corpus version). Readers only ever see builds whose status is 'ready';
-- the flip to 'ready' happens in one UPDATE after every row is loaded and the ANN index exists.
CREATE TABLE index_builds (
    id               bigserial PRIMARY KEY,
    model_uri        text    NOT NULL,
    compression_rate integer NOT NULL,
    corpus_version   text    NOT NULL,
    hidden_size      integer NOT NULL CHECK (hidden_size > 0),
    n_mem_max        integer NOT NULL CHECK (n_mem_max > 0),
    ann_kind         text    NOT NULL CHECK (ann_kind IN ('halfvec', 'bit')),
    status           text    NOT NULL CHECK (status IN ('loading', 'indexing', 'ready', 'failed')),
    n_docs           bigint  NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz
);
CREATE INDEX index_builds_key ON index_builds (model_uri, compression_rate, corpus_version, status);

-- memory: the [n_mem, hidden] tensor as little-endian float16 bytes (compact, exact for fp16/bf16-rounded
-- states, no per-element array overhead; it is never searched in SQL, only re-scored after the ANN stage).
-- ann: the mean of the memory rows; each build gets its own partial HNSW index over it after loading.
CREATE TABLE memories (
    build_id bigint   NOT NULL REFERENCES index_builds (id) ON DELETE CASCADE,
    doc_id   text     NOT NULL,
    n_mem    smallint NOT NULL CHECK (n_mem > 0),
    memory   bytea    NOT NULL,
    ann      vector   NOT NULL,
    PRIMARY KEY (build_id, doc_id)
);
