"""
Caption and QA metrics for the evaluation report (SPEC §6), in plain Python + numpy.

- tokenize_caption: the tokenizer every metric below shares
- bleu4:            corpus BLEU-4 as in the COCO caption evaluation, + smoothed sentence BLEU-4
- cider_d:          CIDEr-D (Vedantam et al. 2015) as in the COCO caption evaluation
- hallucination_rate: CHAIR-i / CHAIR-s style object hallucination against the references
- qa_scores:        exact / contains-match accuracy for the "What is in the image?" set
- length_stats:     word-length distribution of generations vs references
- score_rows:       runs the caption or QA metrics over report rows, attaches per-sample scores
- write_report:     generations.jsonl + report.md (metrics, lengths, thumbnail gallery)

Everything is written from the published definitions; numbers were checked against the
COCO caption evaluation code (pycocoevalcap) on fixed examples, see test_eval.py.
Temporary home: this is meant to be merged into sample.py.
"""

import html
import json
import math
import os
import re
from collections import Counter

import numpy as np

# -----------------------------------------------------------------------------
# tokenization

def tokenize_caption(s):
    """
    Lowercase, drop punctuation, split on whitespace. A "PTB-tokenizer-lite": the COCO
    evaluation runs the Stanford PTB tokenizer (Java) and then drops punctuation tokens.
    This is simpler: apostrophes are deleted ("dog's" -> "dogs", "don't" -> "dont", where PTB
    gives "dog 's", "do n't") and every other non-alphanumeric character, hyphens included,
    becomes a space ("t-shirt" -> "t shirt", "3.5" -> "3 5"). Scores can therefore differ
    slightly from the official toolkit on text with contractions or hyphens.
    """
    s = s.lower().replace("'", "").replace("\u2019", "")
    s = re.sub(r"[^\w\s]|_", " ", s)  # \w keeps unicode letters and digits
    return s.split()

def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

def _check_pairs(candidates, references_list):
    # references may be given as one string per sample for convenience
    if len(candidates) != len(references_list):
        raise ValueError(f"{len(candidates)} candidates but {len(references_list)} reference sets")
    refs = [[r] if isinstance(r, str) else list(r) for r in references_list]
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"sample {i} has no references (captions or answers)")
    return refs

# -----------------------------------------------------------------------------
# BLEU-4 (Papineni et al. 2002), corpus-level as in the COCO caption evaluation

def _bleu_stats(cand, refs, max_n=4):
    """clipped n-gram matches and candidate n-gram totals per order, candidate length, closest ref length"""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        c = _ngrams(cand, n)
        # clip each candidate n-gram count by its largest count in any single reference
        max_ref = Counter()
        for r in refs:
            for g, k in _ngrams(r, n).items():
                max_ref[g] = max(max_ref[g], k)
        matches.append(sum(min(k, max_ref[g]) for g, k in c.items()))
        totals.append(max(0, len(cand) - n + 1))
    # "closest" effective reference length; a tie goes to the shorter reference (as in COCO)
    ref_len = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    return matches, totals, len(cand), ref_len

def _bleu_from_stats(matches, totals, c_len, r_len, smooth=False):
    if c_len == 0:
        return 0.0
    log_p = 0.0
    for n, (m, t) in enumerate(zip(matches, totals)):
        if smooth and m == 0:
            # Chen & Cherry 2014, method 1: a zero match count becomes epsilon = 0.1 (an order
            # the candidate is too short to have counts as one miss), so a sentence without a
            # 4-gram match scores low but not 0. Kept small so unrelated captions stay near 0
            # (BLEU+1 would give ~0.2 to a 6-word caption sharing only "a" with its reference).
            m, t = 0.1, max(t, 1)
        if m == 0:
            return 0.0  # geometric mean with a zero factor (COCO's tiny epsilon gives ~1e-4 here)
        log_p += math.log(m / t) / len(matches)
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)  # brevity penalty
    return bp * math.exp(log_p)

def bleu4(candidates, references_list):
    """
    Returns (corpus BLEU-4, [sentence BLEU-4 per sample]).
    Corpus: clipped n-gram matches and totals summed over the corpus, one brevity penalty from
    the summed candidate and closest-reference lengths, uniform geometric mean of 1..4-gram
    precisions. Per sample: the same on one sentence, smoothed (so these do not average to
    the corpus score; report the corpus score, use per-sample scores to sort and inspect).
    Note: with a one-sample corpus pycocoevalcap switches to the *average* reference length;
    we always use "closest".
    """
    refs = _check_pairs(candidates, references_list)
    stats = [_bleu_stats(tokenize_caption(c), [tokenize_caption(r) for r in rs])
             for c, rs in zip(candidates, refs)]
    per_sample = [_bleu_from_stats(*s, smooth=True) for s in stats]
    if not stats:
        return 0.0, []
    matches = [sum(s[0][n] for s in stats) for n in range(4)]
    totals = [sum(s[1][n] for s in stats) for n in range(4)]
    c_len = sum(s[2] for s in stats)
    r_len = sum(s[3] for s in stats)
    return _bleu_from_stats(matches, totals, c_len, r_len), per_sample

# -----------------------------------------------------------------------------
# CIDEr-D (Vedantam, Zitnick, Parikh 2015), as in the COCO caption evaluation

def cider_d(candidates, references_list, sigma=6.0):
    """
    Returns (corpus mean CIDEr-D, [CIDEr-D per sample]). For each n in 1..4 a caption is a
    TF-IDF vector over its n-grams; IDF is log(#images) - log(max(1, df)) with df = number of
    images whose *reference set* contains the n-gram (so it depends on the evaluated corpus:
    the same caption scores differently in a different corpus). Per reference:
    sum_g min(c_g, r_g) * r_g / (|c| |r|)   (candidate tf clipped by reference tf: no reward
    for repeating an n-gram), times a Gaussian length penalty exp(-(len_c - len_r)^2 / 2 sigma^2).
    Averaged over references and over n, times 10. The maximum is 10 (candidate equal to every
    reference). A one-image corpus scores 0: every reference n-gram then has IDF log(1) = 0.
    """
    refs = _check_pairs(candidates, references_list)
    cands = [tokenize_caption(c) for c in candidates]
    refs = [[tokenize_caption(r) for r in rs] for rs in refs]
    counts = lambda toks: [_ngrams(toks, n) for n in range(1, 5)]
    cand_counts = [counts(c) for c in cands]
    ref_counts = [[counts(r) for r in rs] for rs in refs]

    # document frequency: in how many images' reference sets does each n-gram occur
    df = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for order in rc for g in order})
    log_num_images = math.log(max(1, len(refs)))

    def tfidf(cnts):
        vecs, norms = [], []
        for order in cnts:
            # n-grams never seen in any reference get df 1, i.e. the largest IDF
            v = {g: tf * (log_num_images - math.log(max(1, df[g]))) for g, tf in order.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    scores = []
    for c, cc, rs, rcs in zip(cands, cand_counts, refs, ref_counts):
        vc, nc = tfidf(cc)
        total = 0.0
        for r, rc in zip(rs, rcs):
            vr, nr = tfidf(rc)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                if nc[n] == 0 or nr[n] == 0:
                    continue  # caption shorter than n words, or all its n-grams are in every image
                # clipping tf * idf by the reference's tf * idf is clipping tf (same idf)
                dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                total += penalty * dot / (nc[n] * nr[n])
        scores.append(10.0 * total / (4 * len(rs)))
    return (float(np.mean(scores)) if scores else 0.0), scores

# -----------------------------------------------------------------------------
# object hallucination (CHAIR, Rohrbach et al. 2018, simplified to caption references)


# Canonical object -> its surface forms (comma separated; the canonical name is listed
# first). The 80 COCO categories ("sports ball" -> ball, "potted plant" -> plant,
# "dining table" -> table), common synonyms, a few other frequent concrete caption nouns, and
# the synthetic dataset's shapes. Left out on purpose: "orange" (mostly a colour in captions,
# and colours are the synthetic set's main attribute) and "hair drier". Regular plurals are
# handled by _lookup_object, irregular ones are listed. Known limits, shared with CHAIR: no
# negation ("no dogs" still names a dog) and no word sense ("remote area" names a remote).
_OBJECTS = {
    "person": "person, people, man, men, woman, women, boy, girl, child, children, kid, baby, "
              "guy, lady, player, skier, surfer, skateboarder",
    "bicycle": "bicycle, bike", "car": "car, automobile, taxi", "motorcycle": "motorcycle, motorbike",
    "airplane": "airplane, aeroplane, plane, jet, aircraft, airliner", "bus": "bus",
    "train": "train", "truck": "truck", "boat": "boat, ship, yacht, canoe, kayak",
    "traffic light": "traffic light", "fire hydrant": "fire hydrant, hydrant",
    "stop sign": "stop sign", "parking meter": "parking meter", "bench": "bench",
    "bird": "bird, seagull, pigeon, duck", "cat": "cat, kitten, kitty", "dog": "dog, puppy",
    "horse": "horse, pony", "sheep": "sheep, lamb", "cow": "cow, cattle, calf",
    "elephant": "elephant", "bear": "bear", "zebra": "zebra", "giraffe": "giraffe",
    "backpack": "backpack", "umbrella": "umbrella, parasol", "handbag": "handbag, purse",
    "tie": "tie, necktie", "suitcase": "suitcase, luggage", "frisbee": "frisbee",
    "skis": "skis, ski", "snowboard": "snowboard", "ball": "ball, football, soccer ball",
    "kite": "kite", "baseball bat": "baseball bat, bat",
    "baseball glove": "baseball glove, glove, mitt", "skateboard": "skateboard",
    "surfboard": "surfboard", "tennis racket": "tennis racket, racket, racquet",
    "bottle": "bottle", "wine glass": "wine glass", "cup": "cup, mug", "fork": "fork",
    "knife": "knife, knives", "spoon": "spoon", "bowl": "bowl", "banana": "banana",
    "apple": "apple", "sandwich": "sandwich, burger, hamburger", "broccoli": "broccoli",
    "carrot": "carrot", "hot dog": "hot dog", "pizza": "pizza", "donut": "donut, doughnut",
    "cake": "cake, cupcake", "chair": "chair, stool", "couch": "couch, sofa",
    "plant": "plant, potted plant, houseplant", "bed": "bed", "table": "table, desk, dining table",
    "toilet": "toilet", "tv": "tv, television", "laptop": "laptop, computer",
    "mouse": "mouse, mice", "remote": "remote", "keyboard": "keyboard",
    "phone": "phone, cellphone, cell phone, smartphone", "microwave": "microwave",
    "oven": "oven, stove", "toaster": "toaster", "sink": "sink",
    "refrigerator": "refrigerator, fridge", "book": "book", "clock": "clock", "vase": "vase",
    "scissors": "scissors", "teddy bear": "teddy bear, teddy", "toothbrush": "toothbrush",
    # other frequent, concrete caption nouns
    "tree": "tree", "flower": "flower", "building": "building", "house": "house",
    "window": "window", "door": "door", "lamp": "lamp", "mirror": "mirror", "pillow": "pillow",
    "box": "box", "basket": "basket", "bag": "bag", "hat": "hat, cap", "shoe": "shoe",
    "flag": "flag", "fence": "fence", "guitar": "guitar", "bridge": "bridge", "tower": "tower",
    "mountain": "mountain", "sign": "sign",
    # shapes drawn by the synthetic dataset
    "circle": "circle", "square": "square", "triangle": "triangle", "diamond": "diamond",
    "star": "star", "cross": "cross",
}
OBJECT_WORDS = {w.strip(): obj for obj, words in _OBJECTS.items() for w in words.split(",")}

def _lookup_object(phrase, vocab):
    # the word itself, else undo a regular English plural: -ies -> -y, -es, -s
    if phrase in vocab:
        return vocab[phrase]
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if phrase.endswith(suffix) and phrase[:-len(suffix)] + repl in vocab:
            return vocab[phrase[:-len(suffix)] + repl]
    return None

def _objects_in(tokens, vocab):
    found, i = [], 0
    while i < len(tokens):
        # two-word phrases first, so a "hot dog" is not a dog and a "teddy bear" not a bear
        if i + 1 < len(tokens):
            obj = _lookup_object(tokens[i] + " " + tokens[i + 1], vocab)
            if obj is not None:
                found.append(obj)
                i += 2
                continue
        obj = _lookup_object(tokens[i], vocab)
        if obj is not None:
            found.append(obj)
        i += 1
    return found

def hallucination_rate(candidates, references_list, vocab=OBJECT_WORDS):
    """
    Objects named in a generation but in none of that sample's references. Returns
    (summary, [sorted hallucinated objects per sample]) where summary has
      chair_i: hallucinated objects / objects mentioned (each object counted once per caption)
      chair_s: captions with at least one hallucinated object / captions
    and the raw counts. vocab maps surface words/phrases to canonical objects (a plain list of
    words also works); synonyms map to one object, so "puppy" in the generation is grounded by
    "dog" in a reference. CHAIR proper checks against COCO segmentations too; here the
    references are the only ground truth, so an object that is present but unmentioned counts.
    """
    refs = _check_pairs(candidates, references_list)
    if not isinstance(vocab, dict):
        vocab = {w: w for w in vocab}
    per_sample = []
    mentioned = hallucinated = captions_with = 0
    for c, rs in zip(candidates, refs):
        gen = set(_objects_in(tokenize_caption(c), vocab))
        ref = set()
        for r in rs:
            ref.update(_objects_in(tokenize_caption(r), vocab))
        h = sorted(gen - ref)
        per_sample.append(h)
        mentioned += len(gen)
        hallucinated += len(h)
        captions_with += bool(h)
    summary = {
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "chair_s": captions_with / len(per_sample) if per_sample else 0.0,
        "objects_mentioned": mentioned,
        "objects_hallucinated": hallucinated,
        "captions_with_hallucination": captions_with,
        "captions": len(per_sample),
    }
    return summary, per_sample

# -----------------------------------------------------------------------------
# "What is in the image?" QA sanity set

_ARTICLES = {"a", "an", "the"}

def _normalize_answer(s):
    return " ".join(t for t in tokenize_caption(s) if t not in _ARTICLES)

def qa_scores(predictions, answers_list):
    """
    Exact match: the normalised prediction equals any normalised answer. Contains match: any
    normalised answer occurs in the normalised prediction as a whole-word phrase ("red circle"
    is in "there is a red circle", "cat" is not in "scattered"). Normalising = tokenize_caption
    + dropping a/an/the. answers_list holds one string or a list of accepted strings per sample.
    Returns {"exact", "contains", "n", "exact_per_sample", "contains_per_sample"}.
    """
    answers = _check_pairs(predictions, answers_list)
    exact, contains = [], []
    for p, accepted in zip(predictions, answers):
        p = _normalize_answer(p)
        accepted = [a for a in map(_normalize_answer, accepted) if a]  # "the" alone checks nothing
        exact.append(any(p == a for a in accepted))
        contains.append(any(f" {a} " in f" {p} " for a in accepted))
    n = len(exact)
    return {
        "exact": sum(exact) / n if n else 0.0,
        "contains": sum(contains) / n if n else 0.0,
        "n": n,
        "exact_per_sample": exact,
        "contains_per_sample": contains,
    }

# -----------------------------------------------------------------------------
# caption length distribution

LENGTH_BINS = (0, 5, 10, 15, 20, 30, 40, 60)  # lower edges in words; the last bin is open

def _length_summary(lengths):
    x = np.asarray(lengths, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": 0.0, "median": 0.0, "p10": 0.0, "p90": 0.0, "hist": [0] * len(LENGTH_BINS)}
    hist = np.bincount(np.searchsorted(LENGTH_BINS, x, side="right") - 1, minlength=len(LENGTH_BINS))
    return {
        "n": int(len(x)),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p10": float(np.percentile(x, 10)),
        "p90": float(np.percentile(x, 90)),
        "hist": hist.tolist(),
    }

def length_stats(candidates, references_list):
    """Word lengths (tokenize_caption) of the generations vs every reference caption."""
    refs = _check_pairs(candidates, references_list)
    bins = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:])] + [f"{LENGTH_BINS[-1]}+"]
    return {
        "bins": bins,
        "generated": _length_summary([len(tokenize_caption(c)) for c in candidates]),
        "references": _length_summary([len(tokenize_caption(r)) for rs in refs for r in rs]),
    }

# -----------------------------------------------------------------------------
# glue: score report rows

def score_rows(rows):
    """
    Rows are dicts with "generation" and either "references" (captioning) or "answers" (QA).
    Attaches per-sample scores to each row in place (bleu4, cider_d, hallucinated / exact,
    contains) and returns the set's summary metrics. Score each set (val, golden, QA)
    separately: CIDEr-D's IDF depends on the corpus it is computed over.
    """
    metrics = {}
    cap = [r for r in rows if r.get("references")]
    if cap:
        cands, refs = [r["generation"] for r in cap], [r["references"] for r in cap]
        b, b_per = bleu4(cands, refs)
        c, c_per = cider_d(cands, refs)
        h, h_per = hallucination_rate(cands, refs)
        for r, bs, cs, hs in zip(cap, b_per, c_per, h_per):
            r["bleu4"], r["cider_d"], r["hallucinated"] = bs, cs, hs
        metrics.update(n_captions=len(cap), bleu4=b, cider_d=c, chair_i=h["chair_i"], chair_s=h["chair_s"],
                       length=length_stats(cands, refs))
    qa = [r for r in rows if r.get("answers")]
    if qa:
        q = qa_scores([r["generation"] for r in qa], [r["answers"] for r in qa])
        for r, e, k in zip(qa, q["exact_per_sample"], q["contains_per_sample"]):
            r["exact"], r["contains"] = e, k
        metrics.update(n_qa=q["n"], qa_exact=q["exact"], qa_contains=q["contains"])
    return metrics

# -----------------------------------------------------------------------------
# the report: generations.jsonl + report.md with a thumbnail gallery

def _thumbnail(src, dst, size=128):
    """src: an image path or a PIL image. Returns True if dst was written."""
    from PIL import Image, ImageOps
    try:
        if isinstance(src, Image.Image):
            im = ImageOps.exif_transpose(src)  # a copy: the caller's image is untouched
        else:
            with Image.open(src) as f:
                f.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale, much faster
                im = ImageOps.exif_transpose(f)
        im = im.convert("RGB")
        im.thumbnail((size, size))
        im.save(dst, "JPEG", quality=85)
        return True
    except Exception:  # an unreadable image costs its thumbnail, never the report
        return False

def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)  # last resort: one odd value must not lose the whole file

def _md(s):
    # one table cell: escape HTML ("<image>" would vanish), pipes, and newlines
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("\n", "<br>")

def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4f}"
    return str(v)

def _is_length_stats(v):
    return isinstance(v, dict) and "bins" in v and "generated" in v and "references" in v

def _walk_metrics(d, prefix=""):
    """yields (dotted key, value) for scalars and length-stat tables; lists (per-sample) are skipped"""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if _is_length_stats(v):
            yield key, v
        elif isinstance(v, dict):
            yield from _walk_metrics(v, key + ".")
        elif isinstance(v, (bool, int, float, str, np.number, np.bool_)):
            yield key, v

def _row_scores(row):
    parts = []
    if "bleu4" in row:
        parts.append(f"BLEU-4 {row['bleu4']:.3f}")
    if "cider_d" in row:
        parts.append(f"CIDEr-D {row['cider_d']:.3f}")
    if row.get("hallucinated"):
        parts.append("hallucinated: " + ", ".join(row["hallucinated"]))
    for k in ("exact", "contains"):
        if k in row:
            parts.append(f"{k} {'yes' if row[k] else 'no'}")
    return "<br>".join(_md(p) for p in parts)

def write_report(out_dir, rows, metrics, thumbs=True, title="Evaluation report", gallery_size=32):
    """
    Writes out_dir/generations.jsonl (every row: id, image, prompt, generation, references,
    then any per-sample scores; a row's PIL image under "pil" is not written) and
    out_dir/report.md: metrics table, length distributions, and a gallery of the first
    gallery_size rows with 128px JPEG thumbnails in out_dir/thumbs/. Rows name their image by
    path under "image" (or a list of paths, multi-image) or carry it under "pil". All links are
    relative to out_dir, so the folder renders wherever it is copied. Returns report.md's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generations.jsonl"), "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            out = {"id": row.get("id", i), "image": row.get("image"), "prompt": row.get("prompt"),
                   "generation": row.get("generation"), "references": row.get("references")}
            out.update((k, v) for k, v in row.items() if k not in out and k != "pil")
            f.write(json.dumps(out, ensure_ascii=False, default=_jsonable) + "\n")

    lines = [f"# {title}", "",
             f"{len(rows)} generations; every one, with its per-sample scores, is in "
             f"[generations.jsonl](generations.jsonl).", ""]

    found = list(_walk_metrics(metrics))
    scalars = [(k, v) for k, v in found if not _is_length_stats(v)]
    if scalars:
        lines += ["## Metrics", "",
                  "BLEU-4 (corpus) and CIDEr-D as in the COCO caption evaluation, on lowercased "
                  "captions with punctuation removed. chair_i: hallucinated objects / objects named; "
                  "chair_s: captions naming at least one object absent from the references.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {_md(_fmt(v))} |" for k, v in scalars]
        lines.append("")

    for key, ls in ((k, v) for k, v in found if _is_length_stats(v)):
        lines += [f"## Caption length in words: {_md(key)}", "",
                  "| | n | mean | median | p10 | p90 |", "|---|---|---|---|---|---|"]
        for name in ("generated", "references"):
            s = ls[name]
            lines.append(f"| {name} | {s['n']} | {s['mean']:.1f} | {s['median']:.1f} | {s['p10']:.1f} | {s['p90']:.1f} |")
        lines += ["", "| words | generated | references |", "|---|---|---|"]
        g_n, r_n = max(1, ls["generated"]["n"]), max(1, ls["references"]["n"])
        for b, g, r in zip(ls["bins"], ls["generated"]["hist"], ls["references"]["hist"]):
            lines.append(f"| {b} | {g} ({100 * g / g_n:.0f}%) | {r} ({100 * r / r_n:.0f}%) |")
        lines.append("")

    shown = rows[:gallery_size]
    if shown:
        if thumbs:
            os.makedirs(os.path.join(out_dir, "thumbs"), exist_ok=True)
        lines += [f"## Gallery (first {len(shown)} of {len(rows)})", ""]
        lines += ["| # | image | generation | reference | scores |", "|---|---|---|---|---|"] if thumbs else \
                 ["| # | generation | reference | scores |", "|---|---|---|---|"]
        for i, row in enumerate(shown):
            refs = row.get("references") or row.get("answers") or []
            refs = [refs] if isinstance(refs, str) else refs
            cells = [_md(row.get("id", i))]
            if thumbs:
                srcs = row["pil"] if row.get("pil") is not None else row.get("image")
                srcs = srcs if isinstance(srcs, (list, tuple)) else ([] if srcs is None else [srcs])
                imgs = []
                for k, src in enumerate(srcs):
                    name = f"thumbs/{i:04d}_{k}.jpg"  # by position: ids can hold any character
                    if _thumbnail(src, os.path.join(out_dir, name)):
                        imgs.append(f"![{_md(row.get('id', i))}]({name})")
                cells.append(" ".join(imgs))
            cells += [_md(row.get("generation", "")), "<br>".join(_md(r) for r in refs), _row_scores(row)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
