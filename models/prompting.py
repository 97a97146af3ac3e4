"""Classifier-free-guidance masks from prompt token ids (the upstream processor's rule, UPSTREAM.md 4.2).

  * uncond: 0 over the last user turn's content, from the end of the last user prefix up to (not
    including) the next assistant prefix; all ones when no assistant prefix follows;
  * text-uncond: in the same span (running to the end when no assistant prefix follows), 0 only over
    tokens that are not image tokens (`<image>`, `<imagePatch>`, `</image>`).
  * generation rows: [cond, uncond] plus text-uncond when it differs anywhere from uncond.
"""
from __future__ import annotations

from typing import Sequence

import torch


def find_all(seq: Sequence[int], sub: Sequence[int]) -> list[int]:
    n = len(sub)
    if n == 0:
        return []
    return [i for i in range(len(seq) - n + 1) if list(seq[i:i + n]) == list(sub)]


def _last_user_span(seq, user_prefix, assistant_prefix):
    users = find_all(seq, user_prefix)
    if not users:
        return None
    last = users[-1]
    nxt = next((p for p in find_all(seq, assistant_prefix) if p >= last), None)
    return last + len(user_prefix), nxt


def cfg_masks(input_ids: Sequence[int], user_prefix: Sequence[int], assistant_prefix: Sequence[int],
              image_token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(uncond_mask, text_uncond_mask) for one prompt, each a list of 0/1 as long as the prompt."""
    seq = list(input_ids)
    uncond, text_uncond = [1] * len(seq), [1] * len(seq)
    span = _last_user_span(seq, user_prefix, assistant_prefix)
    if span is not None:
        start, end = span
        if end is not None:
            for i in range(start, end):
                uncond[i] = 0
        image_ids = set(image_token_ids)
        for i in range(start, len(seq) if end is None else end):
            if seq[i] not in image_ids:
                text_uncond[i] = 0
    return uncond, text_uncond


def generation_rows(attention_mask: torch.Tensor, uncond: torch.Tensor | None,
                    text_uncond: torch.Tensor | None) -> torch.Tensor:
    """Key masks of the CFG rows, (B, R, L): cond, uncond[, text-uncond], R the same for every prompt.

    attention_mask (B, L) covers the tokens generation starts from (prompt + `<image>`); the shorter
    uncond masks (B, P) are padded with its tail, as upstream does. The text-uncond row is added when
    it differs from uncond for any prompt; for a prompt where it does not, the row equals uncond and
    the guidance formula reduces exactly to the two-row one.
    """
    rows = [attention_mask]

    def pad(m):
        m = m.to(attention_mask.dtype)
        return torch.cat([m, attention_mask[:, m.shape[1]:]], dim=1) if m.shape[1] < attention_mask.shape[1] else m

    if uncond is not None:
        rows.append(pad(uncond))
        if text_uncond is not None and int(text_uncond.sum()) > 0:
            tu = pad(text_uncond)
            if not torch.equal(tu, rows[1]):
                rows.append(tu)
    return torch.stack(rows, dim=1)
