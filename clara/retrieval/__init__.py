"""Retrieval: the raw-text first stages (BM25, a sentence encoder), reciprocal-rank fusion, and CLaRa's re-rank of
compressed documents by the query reasoner. Evaluation, serving and E2E training all retrieve through here; the
store's own first stages run in SQL (``clara.store.search``, which owns it).

- ``dense``: the bundled sentence encoder (all-MiniLM-L6-v2);
- ``first_stage``: BM25 and MiniLM over an in-memory corpus;
- ``fusion``: reciprocal-rank fusion, the hybrid retriever, and the raw-text baselines by name;
- ``rerank``: ``ClaraRetriever``, the query reasoner over a store build or an exact in-memory index.
"""
