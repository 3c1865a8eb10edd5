"""The rows that flow between stages, written down once: column names, types, what each stage adds.
How a batch of rows becomes model input is :mod:`rayalign.packing`.

    column                 type             added by     meaning
    source                 string           data         the file the pair came from
    row                    int64            data         its line (JSONL) or row (Parquet) in that file
    prompt_ids             list<int32>      data         prompt token ids (chat template applied)
    chosen_ids             list<int32>      data         chosen response token ids
    rejected_ids           list<int32>      data         rejected response token ids
    ref_chosen_logps       float64          reference    Σ log π_ref(y_w|x) over the response tokens
    ref_rejected_logps     float64          reference    Σ log π_ref(y_l|x)
    chosen_tokens          int32            reference    |y_w| in tokens (scored positions)
    rejected_tokens        int32            reference    |y_l|
    chosen_token_logps     list<float64>    reference    per-token log π_ref(y_w|x); refcheck only
    rejected_token_logps   list<float64>    reference    per-token log π_ref(y_l|x); refcheck only
    tokens_digest          binary(16)       reference    digest of the pair's token ids: the reference store's row key
    desirable              bool             data         unpaired rows only (KTO): the completion's label

An unpaired row (a loss that takes unpaired completions, rayalign.loss_specs) is laid out as a pair, so the
layouts, the reference scorer and its store take it unchanged: its completion y where a pair's chosen response
is (``completion_ids`` is ``chosen_ids``), and where the rejected one is, the KL completion y': another row's
completion, scored under this row's prompt for KTO's KL estimate (``kl_completion_ids`` is ``rejected_ids``).

A scored row, for example::

    {"source": "hh.jsonl.gz", "row": 17, "prompt_ids": [1, 87, 5], "chosen_ids": [9, 2],
     "rejected_ids": [4], "ref_chosen_logps": -7.1, "ref_rejected_logps": -3.2,
     "chosen_tokens": 2, "rejected_tokens": 1}

Inside the data stage, before the quarantine is split off, rows also carry the raw ``record`` (kept only
when rejected), a ``read_error`` when it could not be read as text, its ``status`` (``ok`` or the rejection
reason), the ``field`` and ``detail`` of the rejection, and whether the pair was ``truncated``; only the
columns above leave the stage.

(``source``, ``row``) identifies a pair across stages (the held-out split hashes it; refcheck joins on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SOURCE = "source"
ROW = "row"
PROMPT_IDS = "prompt_ids"
CHOSEN_IDS = "chosen_ids"
REJECTED_IDS = "rejected_ids"
REF_CHOSEN_LOGPS = "ref_chosen_logps"
REF_REJECTED_LOGPS = "ref_rejected_logps"
CHOSEN_TOKENS = "chosen_tokens"
REJECTED_TOKENS = "rejected_tokens"
CHOSEN_TOKEN_LOGPS = "chosen_token_logps"
REJECTED_TOKEN_LOGPS = "rejected_token_logps"
TOKENS_DIGEST = "tokens_digest"  # rayalign.reference.store; never leaves the reference stage
DESIRABLE = "desirable"
COMPLETION_IDS = CHOSEN_IDS  # an unpaired row's completion (see above)
KL_COMPLETION_IDS = REJECTED_IDS  # an unpaired row's KL completion

# The data stage's working columns (see above).
RECORD = "record"
READ_ERROR = "read_error"  # "reason: detail" when the record could not even be read as text, else null
STATUS = "status"
OK = "ok"  # the status of a usable pair
FIELD = "field"
DETAIL = "detail"
TRUNCATED = "truncated"

PAIR_KEY = (SOURCE, ROW)
TOKEN_COLUMNS = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS)
RESPONSE_COLUMNS = (CHOSEN_IDS, REJECTED_IDS)  # collation order: B chosen rows, then B rejected rows
REFERENCE_COLUMNS = (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, CHOSEN_TOKENS, REJECTED_TOKENS)
TOKEN_LOGPS_COLUMNS = (CHOSEN_TOKEN_LOGPS, REJECTED_TOKEN_LOGPS)
SCORED_COLUMNS = (*TOKEN_COLUMNS, *REFERENCE_COLUMNS)


def pair_sequences(batch: Mapping[str, Sequence[Sequence[int]]]) -> tuple[list[list[int]], list[int]]:
    """B pairs as 2B full sequences (prompt + response ids): chosen rows, then rejected rows; and
    each sequence's prompt length."""
    sequences, prompt_lens = [], []
    for response_column in RESPONSE_COLUMNS:
        for prompt, response in zip(batch[PROMPT_IDS], batch[response_column]):
            sequences.append([*map(int, prompt), *map(int, response)])
            prompt_lens.append(len(prompt))
    return sequences, prompt_lens
