"""Retrieval metrics: volume->volume MAP@k (the CT-CLIP definition) and Recall@k.

Similarity matrices are float[Q, M]: row = query, column = database item, higher =
more similar (e.g. `cosine_similarity` of latents).  Ranking sorts each row by
decreasing similarity and breaks ties by the lower column index, which is what the
original's stable ``sorted(..., reverse=True)`` does.

Volume -> volume ("MAP@k", scripts/volume_to_volume_new.py in the official repo).
Relevance of a retrieved volume r to a query q is graded, the Jaccard index of their
sets of positive labels::

    rel(q, r) = |pos(q) & pos(r)| / |pos(q) | pos(r)|      (its `calc_similarity`)

and the per-query value is the mean relevance of the top k, (1/k) sum_{j<=k}
rel(q, r_j); MAP@k is the mean over queries.  Despite the name this is a graded
precision@k, not an average of precisions; `binary_map_at_k` gives the IR-textbook
MAP@k for readers who expect that.  Where the original differs from `map_at_k`'s
defaults (``ORIGINAL_MAP_SETTINGS`` restores the first three):

* it does not exclude the query from the database, so a query with any positive
  label retrieves itself at rank 1 (relevance 1); we exclude it (``exclude_self``);
* it keeps all-negative queries, whose relevance to every (non-empty) database item
  is 0, so they count as 0; we skip them (``all_negative_queries="skip"``);
* it drops all-negative volumes from the database; we keep them, as a real archive
  holds normal scans (``all_negative_database="keep"``);
* its list of per-query values is never reset between k in (1, 5, 10, 50), so the
  number printed for k is the mean over all k' <= k; each call here is one k.

Report -> volume (scripts/report_to_volume_new.py): report i's match is volume i and
R@k is the fraction of reports whose volume is among the k most similar (dot product
of unit latents, i.e. cosine) -- the standard image-text Recall@k, so `recall_at_k`
of ``similarity[report, volume]`` reproduces it.  Its random baseline draws fresh
uniform [0, 1)^512 vectors for every (report, volume) pair and every k, so its
expected value is exactly k / M (`chance_recall_at_k`); `random_embedding_recall_at_k`
gives a seeded draw of that baseline.
"""

from __future__ import annotations

import numpy as np

NEGATIVE_QUERY_RULES = ("skip", "zero")
NEGATIVE_DATABASE_RULES = ("keep", "drop")
ORIGINAL_MAP_SETTINGS = {"exclude_self": False, "all_negative_queries": "zero",
                         "all_negative_database": "drop"}
_ROWS = 1024  # query rows ranked at a time; bounds the [rows, M] temporaries.


def cosine_similarity(a, b) -> np.ndarray:
    """float[N, M] cosine similarity between the rows of a float[N, L] and b float[M, L]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be [N, L] and [M, L], got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def _check_similarity(similarity, name: str = "similarity") -> np.ndarray:
    similarity = np.asarray(similarity, np.float64)
    if similarity.ndim != 2 or similarity.size == 0:
        raise ValueError(f"{name} must be a non-empty [Q, M] matrix, got {similarity.shape}")
    if np.isnan(similarity).any():
        raise ValueError(f"{name} contains NaN")
    return similarity


def _check_k(k, available: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > available:
        raise ValueError(f"k = {k} exceeds the {available} database items a query can "
                         "retrieve")
    return int(k)


def correct_match_ranks(similarity) -> np.ndarray:
    """int[Q]: 0-based rank of column i in row i (Q <= M; other columns are distractors).

    rank_i = #{j : s_ij > s_ii} + #{j < i : s_ij = s_ii}, the position of item i after
    a stable sort by decreasing similarity.
    """
    similarity = _check_similarity(similarity)
    num_queries, num_items = similarity.shape
    if num_queries > num_items:
        raise ValueError(f"similarity must have at least as many columns as rows (row i's "
                         f"match is column i), got {similarity.shape}")
    ranks = np.empty(num_queries, np.int64)
    columns = np.arange(num_items)
    for start in range(0, num_queries, _ROWS):
        rows = np.arange(start, min(start + _ROWS, num_queries))
        block = similarity[rows]
        own = block[np.arange(len(rows)), rows][:, None]
        ranks[rows] = ((block > own) | ((block == own) & (columns < rows[:, None]))).sum(1)
    return ranks


def recall_at_k(similarity, k: int) -> float:
    """Fraction of rows i whose match, column i, is among the k most similar columns.

    similarity: float[Q, M] with Q <= M (e.g. report->volume: rows reports, columns
    volumes; volume->report: pass the transpose).  Ties as in `correct_match_ranks`.
    """
    ranks = correct_match_ranks(similarity)
    k = _check_k(k, np.shape(similarity)[1])
    return float(np.mean(ranks < k))


def chance_recall_at_k(num_candidates: int, k: int) -> float:
    """Expected Recall@k of a ranking that ignores the data: k / M."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return _check_k(k, num_candidates) / num_candidates


def random_embedding_recall_at_k(num_queries: int, k: int, seed: int = 0, dim: int = 512,
                                 num_candidates: int | None = None) -> float:
    """Recall@k of seeded random unit embeddings (the random-baseline row).

    Draws float[Q, dim] and float[M, dim] standard normal vectors (M = num_candidates,
    default Q) and scores their cosine similarity with `recall_at_k`; its expectation
    is `chance_recall_at_k(M, k)`.
    """
    num_candidates = num_queries if num_candidates is None else num_candidates
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((num_queries, dim))
    candidates = rng.standard_normal((num_candidates, dim))
    return recall_at_k(cosine_similarity(queries, candidates), k)


def _check_retrieval_inputs(query_labels, db_labels, similarity):
    query = np.asarray(query_labels)
    db = np.asarray(db_labels)
    for name, arr in (("query_labels", query), ("db_labels", db)):
        if arr.ndim != 2 or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be a [., C] matrix of 0/1 labels (unknown "
                             "labels have no defined relevance)")
    if query.shape[1] != db.shape[1]:
        raise ValueError(f"query_labels has {query.shape[1]} classes, db_labels "
                         f"{db.shape[1]}")
    similarity = _check_similarity(similarity)
    if similarity.shape != (len(query), len(db)):
        raise ValueError(f"similarity must be [Q, M] = [{len(query)}, {len(db)}], got "
                         f"{similarity.shape}")
    return query.astype(bool), db.astype(bool), similarity


def _candidate_mask(query, db, exclude_self: bool, all_negative_database: str):
    """bool[Q, M]: which database items each query may retrieve."""
    if all_negative_database not in NEGATIVE_DATABASE_RULES:
        raise ValueError(f"all_negative_database must be one of {NEGATIVE_DATABASE_RULES}, "
                         f"got {all_negative_database!r}")
    allowed = np.ones((len(query), len(db)), bool)
    if all_negative_database == "drop":
        allowed[:, ~db.any(1)] = False
    if exclude_self:
        if len(query) != len(db):
            raise ValueError("exclude_self needs the queries to be the database "
                             f"(Q == M), got Q = {len(query)}, M = {len(db)}")
        np.fill_diagonal(allowed, False)
    return allowed


def _top_k(similarity, allowed, k: int) -> np.ndarray:
    """int[Q, k] indices of the k most similar allowed items (stable tie-break)."""
    _check_k(k, int(allowed.sum(1).min()))
    masked = np.where(allowed, similarity, -np.inf)
    top = np.empty((len(similarity), k), np.int64)
    for start in range(0, len(similarity), _ROWS):
        top[start:start + _ROWS] = np.argsort(-masked[start:start + _ROWS], axis=1,
                                              kind="stable")[:, :k]
    return top


def map_at_k_per_query(query_labels, db_labels, similarity, k: int,
                       exclude_self: bool = True, all_negative_queries: str = "skip",
                       all_negative_database: str = "keep") -> np.ndarray:
    """float[Q]: mean Jaccard relevance of each query's top k (module docstring).

    NaN for queries left out (all-negative queries under ``"skip"``).
    """
    if all_negative_queries not in NEGATIVE_QUERY_RULES:
        raise ValueError(f"all_negative_queries must be one of {NEGATIVE_QUERY_RULES}, "
                         f"got {all_negative_queries!r}")
    query, db, similarity = _check_retrieval_inputs(query_labels, db_labels, similarity)
    allowed = _candidate_mask(query, db, exclude_self, all_negative_database)
    retrieved = db[_top_k(similarity, allowed, k)]  # bool[Q, k, C]
    shared = (retrieved & query[:, None, :]).sum(-1)
    union = (retrieved | query[:, None, :]).sum(-1)
    # union == 0 only for an all-negative query and an all-negative item; that query
    # is skipped or counted as 0 below, so the value used here does not matter.
    relevance = shared / np.maximum(union, 1)
    per_query = relevance.mean(1)
    negative = ~query.any(1)
    per_query[negative] = np.nan if all_negative_queries == "skip" else 0.0
    return per_query


def map_at_k(query_labels, db_labels, similarity, k: int, exclude_self: bool = True,
             all_negative_queries: str = "skip",
             all_negative_database: str = "keep") -> float:
    """Volume->volume MAP@k as CT-CLIP defines it (Jaccard relevance; module docstring).

    Args:
      query_labels: int[Q, C] 0/1 labels of the queries.
      db_labels: int[M, C] 0/1 labels of the database.
      similarity: float[Q, M], e.g. `cosine_similarity(query_latents, db_latents)`.
      k: number of retrieved items scored; one k per call (no state between calls).
      exclude_self: query i is database item i and may not retrieve itself (Q == M).
      all_negative_queries: "skip" (left out of the mean) or "zero" (count as 0, the
        original).
      all_negative_database: "keep", or "drop" (never retrieved, the original).
    Returns:
      Mean over the queries that are not skipped; NaN if every query is skipped.
    """
    per_query = map_at_k_per_query(query_labels, db_labels, similarity, k, exclude_self,
                                   all_negative_queries, all_negative_database)
    kept = per_query[~np.isnan(per_query)]
    return float(kept.mean()) if kept.size else float("nan")


def binary_map_at_k(query_labels, db_labels, similarity, k: int,
                    exclude_self: bool = True, all_negative_database: str = "keep"
                    ) -> float:
    """Textbook MAP@k with binary relevance "shares at least one positive label".

    AP@k(q) = sum_{j<=k} rel_j * P@j / min(k, R_q), with P@j the fraction of relevant
    items among the top j and R_q the number of relevant items q could retrieve.
    Queries with R_q = 0 (including every all-negative query) are left out.  Not the
    paper's number (that is `map_at_k`); offered for readers who expect this one.
    """
    query, db, similarity = _check_retrieval_inputs(query_labels, db_labels, similarity)
    allowed = _candidate_mask(query, db, exclude_self, all_negative_database)
    top = _top_k(similarity, allowed, k)
    relevant_all = (query.astype(np.int64) @ db.T.astype(np.int64) > 0) & allowed
    relevant = np.take_along_axis(relevant_all, top, axis=1)  # bool[Q, k]
    precision_at_j = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    num_relevant = relevant_all.sum(1)
    keep = num_relevant > 0
    if not keep.any():
        return float("nan")
    ap = (relevant * precision_at_j).sum(1)[keep] / np.minimum(k, num_relevant[keep])
    return float(ap.mean())
