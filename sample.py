"""
Captions from a trained connector, and the evaluation report.

$ python sample.py --ckpt out/ckpt.pt --image x.jpg                       # temperature 0.2, top_p 0.9
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --greedy
$ python sample.py --ckpt out/ckpt.pt --image a.jpg --image b.jpg         # Template B: k-th <image> = k-th file
$ python sample.py --ckpt out/ckpt.pt --image photos/ --temperature 0.5 --num_samples 3
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --prompt "<image>\nWhat is in the image?\n"
$ python sample.py --ckpt out/ckpt.pt --eval                              # report on val + golden + QA
$ python sample.py --ckpt out/ckpt.pt --export connector/                 # safetensors + JSON to share

Read top to bottom: generation helpers, the caption metrics (BLEU-4, CIDEr-D, hallucination,
QA, lengths) and report writer, the evaluation driver, the command line.
"""
import argparse
import contextlib
import html
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter

import numpy as np
import torch

import data
import model as M

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def parse_args(argv):
    p = argparse.ArgumentParser(description='captions for images from a Stage-1 connector checkpoint')
    p.add_argument('--ckpt', default='out/ckpt.pt', help='ckpt.pt, or an exported connector directory')
    p.add_argument('--image', action='append', default=[], help='image file or directory (repeatable)')
    p.add_argument('--prompt', default=None, help="prompt text; '<image>' marks where each image goes "
                                                   '(default: the training template)')
    p.add_argument('--temperature', type=float, default=0.2, help='0.2-0.7 for captions (design notes); 0 = greedy')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--max_new_tokens', type=int, default=64)
    p.add_argument('--num_samples', type=int, default=1)
    p.add_argument('--greedy', action='store_true', help='argmax decoding (same as --temperature 0)')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--batch_size', type=int, default=32, help='prompts per forward pass')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--export', default=None, help='write the connector as safetensors + JSON to this dir, then exit')
    # evaluation mode
    p.add_argument('--eval', action='store_true', help='write an evaluation report (val split + golden set + QA)')
    p.add_argument('--data_dir', default=None, help='prepared dataset (default: the one the checkpoint trained on)')
    p.add_argument('--num', type=int, default=500, help='val samples to caption (0: all)')
    p.add_argument('--qa', default=None, help='QA sanity JSONL {image, question, answers} (default: the dataset\'s)')
    p.add_argument('--out', default=None, help='report folder (default: <ckpt dir>/report)')
    p.add_argument('--untrained', action='store_true', help='evaluate a freshly initialised connector (baseline)')
    p.add_argument('--no_llm_check', action='store_true', help='skip the frozen-LLM check (it loads a second LLM copy)')
    return p.parse_args(argv)


def setup(ckpt_path, device='auto', dtype='auto'):
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    vlm, tok, ckpt = M.from_checkpoint(ckpt_path, device, {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype])
    return vlm, tok, ckpt, device


def expand_images(paths):
    """Files stay as given; a directory becomes its image files, sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise SystemExit(f'error: image {p} not found')
    return out


def read_image(path, vlm):
    try:
        return data.load_image(path, vlm.image_spec['size'], vlm.image_spec['resample'])
    except Exception as e:
        raise SystemExit(f'error: cannot read image {path} ({type(e).__name__}: {e})') from None


def prompt_ids(vlm, tok, n_images, prompt=None):
    """The training template for 1 or 2 images, or a user prompt (images prepended when it
    has no '<image>' marker)."""
    if prompt is None:
        prompt = data.TEMPLATE_A if n_images == 1 else data.TEMPLATE_B
    prompt = prompt.replace('\\n', '\n')
    if '<image>' not in prompt:
        prompt = '<image>\n' * n_images + prompt
    if prompt.count('<image>') != n_images:
        raise SystemExit(f"error: the prompt has {prompt.count('<image>')} <image> markers for {n_images} images")
    if not prompt.endswith('\n'):
        prompt += '\n'  # the caption follows a newline in training
    return data.encode_prompt(tok, prompt, vlm.connector_args['n_latents'], vlm.slot_id, vlm.brackets)


def caption_batch(vlm, tok, image_groups, prompt=None, temperature=0.0, top_p=0.9, max_new_tokens=64,
                  generator=None, batch_size=32):
    """image_groups: one list of uint8 [3, H, W] arrays per prompt. Returns decoded captions.
    Prompts run batch_size at a time, so a thousand captions are a few dozen forward passes."""
    device = vlm.pix_mean.device
    out = []
    for s in range(0, len(image_groups), batch_size):
        groups = image_groups[s:s + batch_size]
        prompts = [prompt_ids(vlm, tok, len(g), prompt) for g in groups]
        imgs = torch.from_numpy(np.stack([im for g in groups for im in g])).to(device)
        new = vlm.generate(imgs, prompts, max_new_tokens, temperature, top_p, generator)
        out += [' '.join(tok.decode(t, skip_special_tokens=True).split()) for t in new]  # one line each
    return out


# -----------------------------------------------------------------------------
# Caption metrics (written from the published definitions; checked against the COCO caption
# evaluation code on fixed examples in test_smoke.py): BLEU-4, CIDEr-D, CHAIR-style object
# hallucination, QA exact/contains accuracy, caption-length statistics, and the report writer.

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


# -----------------------------------------------------------------------------
# Evaluation: one report folder with every generation and a markdown summary


def read_qa(path):
    """QA JSONL lines {image, question, answers}; image paths relative to the file's folder."""
    rows, root = [], os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append(dict(id=str(r.get('id', n)), image=os.path.join(root, r['image']),
                                 question=r['question'], answers=list(r['answers'])))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f'error: {path}:{n} is not a QA line {{"image", "question", "answers"}} ({e})')
    return rows


@torch.no_grad()
def caption_loss(vlm, batches, autocast=contextlib.nullcontext()):
    """Token-weighted mean caption loss over batches from data.collate (train.py's val loss
    and the report's)."""
    device = vlm.pix_mean.device
    tot = cnt = 0
    for b in batches:
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(b, device)
        with autocast:
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum')
        tot, cnt = tot + loss.item(), cnt + b['n_targets']
    return tot / max(cnt, 1)


def caption_split(vlm, tok, ds, indices, reader, temperature, top_p, max_new_tokens, gen, batch_size, prefix='val'):
    """Rows {id, image, prompt, generation, references} for dataset samples."""
    raws = [[reader.read(k) for k in ds.image_ids(i)] for i in indices]  # read once: pixels and thumbnails
    groups = [[data.load_image(r, ds.size, ds.resample) for r in rs] for rs in raws]
    caps = caption_batch(vlm, tok, groups, None, temperature, top_p, max_new_tokens, gen, batch_size)
    rows = []
    for i, g, rs in zip(indices, caps, raws):
        ids = ds.image_ids(i)
        rows.append(dict(id=f'{prefix}/{i}', image=[reader.path(k) for k in ids] if len(ids) > 1 else reader.path(ids[0]),
                         prompt='template B' if len(ids) > 1 else 'template A', generation=g,
                         references=[tok.decode(ds.caption(i), skip_special_tokens=True).strip()],
                         pil=None if reader.kind == 'folder' else _pil(rs[0])))
    return rows


def _pil(raw):
    from PIL import Image
    return Image.open(io.BytesIO(raw))


@torch.no_grad()
def llm_untouched(vlm, tok, model_args, texts):
    """Text-only logits through the VLM (inputs_embeds path, no images) must equal a freshly
    loaded copy of the base LLM's. Fails if anything modified the frozen LLM."""
    device = vlm.pix_mean.device
    ids = [tok(t, add_special_tokens=False)['input_ids'][:32] or [vlm.eos_id] for t in texts]
    ours = [vlm.llm(inputs_embeds=vlm.embed(None, torch.tensor([i], device=device))).logits.float().cpu() for i in ids]
    dtype = next(vlm.llm.parameters()).dtype
    base = M.build_llm(model_args['llm'], dtype, device, vocab_size=len(tok))
    theirs = [base(input_ids=torch.tensor([i], device=device)).logits.float().cpu() for i in ids]
    del base
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    return diff, diff <= (1e-4 if dtype == torch.float32 else 1e-2)


def evaluate(vlm, tok, model_args, prepared, out_dir, num=500, qa_path=None, temperature=0.0, top_p=0.9,
             max_new_tokens=64, seed=1337, batch_size=32, llm_check=True):
    """Captions the val split (first `num`) and the golden set, runs the QA set, scores
    everything and writes out_dir/{generations.jsonl, report.md, thumbs/}. Returns metrics."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)  # reproducible reports when sampling
    n_lat = model_args['n_latents']
    builder = data.SampleBuilder(tok, n_lat, vlm.slot_id, vlm.eos_id, vlm.brackets)
    ds = data.CaptionDataset(prepared, 'val', builder, vlm.image_spec['size'], vlm.image_spec['resample'])
    reader = ds.reader
    n = len(ds) if num <= 0 else min(num, len(ds))
    metrics = dict(checkpoint=model_args.get('checkpoint', ''), decoding='greedy' if temperature <= 0 else
                   f'temperature {temperature}, top_p {top_p}', seed=seed)
    autocast = torch.autocast(vlm.pix_mean.device.type, dtype=torch.bfloat16,
                              enabled=vlm.pix_mean.device.type == 'cuda')
    loss = caption_loss(vlm, (data.collate([ds[i] for i in items], pad_id=vlm.eos_id)
                              for items in data.eval_batches(n, batch_size)), autocast)
    metrics['val'] = dict(loss=loss, caption_ppl=math.exp(min(loss, 50)))
    val_rows = caption_split(vlm, tok, ds, range(n), reader, temperature, top_p, max_new_tokens, gen, batch_size)
    metrics['val'].update(score_rows(val_rows))
    golden = [i for i in prepared['meta'].get('golden', []) if i < len(ds)]
    gold_rows = caption_split(vlm, tok, ds, golden, reader, temperature, top_p, max_new_tokens, gen, batch_size,
                              prefix='golden')
    if gold_rows:
        metrics['golden'] = score_rows(gold_rows)
    qa_rows = []
    qa_path = qa_path or prepared['meta'].get('qa_file')
    if qa_path and os.path.exists(qa_path):
        qa_rows = read_qa(qa_path)
        groups = [[read_image(r['image'], vlm)] for r in qa_rows]
        by_q = {}
        for k, r in enumerate(qa_rows):  # batch by question: one prompt per batch call
            by_q.setdefault(r['question'], []).append(k)
        for q, ks in by_q.items():
            outs = caption_batch(vlm, tok, [groups[k] for k in ks], '<image>\n' + q + '\n', temperature, top_p,
                                 max_new_tokens, gen, batch_size)
            for k, o in zip(ks, outs):
                qa_rows[k].update(id='qa/' + qa_rows[k]['id'], prompt=q, generation=o)
        metrics['qa'] = score_rows(qa_rows)
    if llm_check:
        texts = [r['references'][0] for r in val_rows[:4]] or ['a photo of a cat.']
        diff, ok = llm_untouched(vlm, tok, model_args, texts)
        metrics['llm_untouched'] = dict(ok=ok, max_abs_logit_diff=diff)
    metrics['seconds'] = time.time() - t0
    write_report(out_dir, gold_rows + val_rows + qa_rows, metrics)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2, default=float)
    return metrics


def main(argv):
    args = parse_args(argv)
    if args.export:
        print(f'exported connector to {M.export_connector(args.ckpt, args.export)}')
        return
    if args.eval:
        return main_eval(args)
    files = expand_images(args.image)
    if not files:
        raise SystemExit('error: give at least one --image (a file or a directory)')
    vlm, tok, ckpt, device = setup(args.ckpt, args.device, args.dtype)
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    n_markers = args.prompt.replace('\\n', '\n').count('<image>') if args.prompt else 0
    if len(args.image) > 1 and all(os.path.isfile(f) for f in args.image) or n_markers > 1:
        groups = [[read_image(f, vlm) for f in files]]  # several files: one multi-image prompt
        names = [' + '.join(files)]
    else:
        groups = [[read_image(f, vlm)] for f in files]
        names = files
    for k in range(args.num_samples):
        caps = caption_batch(vlm, tok, groups, args.prompt, temperature, args.top_p, args.max_new_tokens, gen,
                             args.batch_size)
        for name, cap in zip(names, caps):
            print(f'{name}: {cap}' if len(names) > 1 or args.num_samples > 1 else cap)


def main_eval(args):
    vlm, tok, ckpt, device = setup(args.ckpt, args.device, args.dtype)
    model_args = dict(ckpt['model_args'], checkpoint=args.ckpt)
    if args.untrained:  # the baseline: same backbones, connector as initialised (seeded)
        with M.seeded(device, args.seed):
            fresh = M.build_vlm(ckpt['model_args'], tok, device, next(vlm.llm.parameters()).dtype).connector
        vlm.connector.load_state_dict(fresh.state_dict())
        model_args['checkpoint'] += ' (untrained connector)'
    data_dir = args.data_dir or ckpt.get('config', {}).get('data_dir')
    if not data_dir:
        raise SystemExit('error: give --data_dir (the prepared dataset to evaluate on)')
    prepared = data.open_prepared(data_dir)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'report')
    m = evaluate(vlm, tok, model_args, prepared, out, args.num, args.qa, 0.0 if args.greedy else args.temperature,
                 args.top_p, args.max_new_tokens, args.seed, args.batch_size, not args.no_llm_check)
    print(summary_line(m))
    print(f'report: {os.path.join(out, "report.md")}')


def summary_line(m):
    parts = [f"val loss {m['val']['loss']:.4f} (ppl {m['val']['caption_ppl']:.2f})"]
    v = m['val']
    if 'cider_d' in v:
        parts.append(f"CIDEr-D {v['cider_d']:.3f} | BLEU-4 {v['bleu4']:.3f} | CHAIR-i {v['chair_i']:.3f}")
    if 'qa' in m:
        parts.append(f"QA exact {m['qa']['qa_exact']:.3f} contains {m['qa']['qa_contains']:.3f}")
    if 'llm_untouched' in m:
        parts.append(f"LLM untouched: {m['llm_untouched']['ok']}")
    return ' | '.join(parts)


if __name__ == '__main__':
    main(sys.argv[1:])
