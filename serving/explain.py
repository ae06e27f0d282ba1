"""Why each recommended item is there: `explain: true` on /v1/recommend.

Every item gets at least one reason, in this order of evidence:
- `similar_to_history`: the user's history items closest to it in the model's item-embedding
  space (cosine, from the bundle's item matrix: the very space the list was ranked in);
- `stated_genre`: liked genres it matches (what the user told us);
- otherwise `stated_profile` (a model that reads stated preferences scored it from them),
  `model` (the model knows the user from training, the store holds no history) or `popular` (the popularity list:
  not personalized, or filling up after the liked genres).
Numpy only; reads the same user state the ranking did.
"""
from __future__ import annotations

import numpy as np

N_NEIGHBOURS = 2  # history items named per recommended item: enough to recognise, short enough to read


def explain(rec, user_id: str, response: dict, n_neighbours: int = N_NEIGHBOURS) -> dict:
    """`response` (Recommender.recommend's answer for `user_id`) with `reasons` on every item."""
    state = rec.user_states([user_id])[0]  # the same (cached) state the ranking read
    personalized = bool(response["personalized"])
    idx = rec.item_vocab.encode([it["item_id"] for it in response["items"]])
    history = np.unique(state.items) if personalized else np.zeros(0, np.int64)
    sims = rec.similarity_vectors[idx] @ rec.similarity_vectors[history].T if history.size else np.zeros((len(idx), 0))
    liked = set((state.profile or {}).get("liked_genres") or []) if personalized else set()
    # the model itself ranked the list (else it is the popularity list, maybe led by liked genres)
    model_ranked = personalized and (rec.user_vocab.get(user_id) is not None or state.has_signal(rec.uses_stated))
    items = []
    for j, item in enumerate(response["items"]):
        reasons: list[dict] = []
        for h in np.argsort(-sims[j], kind="stable")[:n_neighbours] if history.size else []:
            meta = rec.items[int(history[h])]
            reasons.append({
                "kind": "similar_to_history", "item_id": meta["item_id"], "title": meta["title"],
                "similarity": round(float(sims[j, h]), 4), "text": f"close to {meta['title']}, which you interacted with",
            })  # fmt: skip
        matched = [g for g in rec.items[int(idx[j])]["genres"] if g in liked]
        if matched:
            reasons.append({"kind": "stated_genre", "genres": matched, "text": f"a genre you said you like: {', '.join(matched)}"})
        if not reasons:
            reasons.append(_fallback(rec, state, model_ranked))
        items.append({**item, "reasons": reasons})
    return {**response, "items": items}


def _fallback(rec, state, model_ranked: bool) -> dict:
    if model_ranked and rec.uses_stated and state.has_signal(True):
        return {"kind": "stated_profile", "text": "scored by the model from the preferences you stated"}
    if model_ranked:
        return {"kind": "model", "text": "scored by the model from what it learned about you in training"}
    if not state.personalize:
        return {"kind": "popular", "text": "popular with everyone (personalization is off for you)"}
    return {"kind": "popular", "text": "popular with everyone (not personalized)"}
