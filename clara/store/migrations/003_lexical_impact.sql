-- Impact-ordered postings (issue: hybrid at scale). Summing whole posting lists made BM25 cost grow with the
-- corpus: at 1M documents a question's frequent words have lists covering most rows (p50 1.6 s). With the postings
-- of each term readable in descending weight order, a query reads only each term's M best postings (see
-- clara.store.search.LEXICAL_POSTINGS_PER_TERM): cost is bounded by M per query term, whatever the corpus size.
CREATE INDEX lexical_postings_impact ON lexical_postings (corpus_version, lexeme, w DESC, doc_id);
