"""
Tests for evaluate.py: caption metrics against hand-computed values and against numbers from
the COCO caption evaluation code, plus hallucination, QA and the report. Runs in about a second.
"""

import json
import math
import os
import re

import pytest
from PIL import Image

from evaluate import (OBJECT_WORDS, bleu4, cider_d, hallucination_rate, length_stats,
                      qa_scores, score_rows, tokenize_caption, write_report)

# A fixed 5-image corpus. Reference numbers below come from pycocoevalcap 1.2 (PyPI wheel;
# Bleu(4) and Cider, which are pure Python), fed the output of tokenize_caption joined by
# spaces, since that toolkit expects pre-tokenized text. Not a dependency of this repo.
CANDS = [
    "A man riding a surfboard on a wave.",
    "Two dogs playing in the grass with a ball.",
    "A plate of rice and broccoli on a table.",
    "A red circle and a green triangle on a white background.",
    "A red stop sign on a city street.",
]
REFS = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "A person on a surfboard riding a wave."],
    ["Two dogs playing with a frisbee in the grass.", "A couple of dogs play in a grassy field.",
     "Two brown dogs running on the grass with a frisbee."],
    ["A plate of food with broccoli and rice.", "A white plate topped with rice and broccoli.",
     "A close up of a plate of food."],
    ["A red circle and a blue square on a white background.", "A red circle to the left of a blue square."],
    ["A stop sign on the corner of a street.", "A red stop sign next to a road."],
]
COCO_BLEU4 = 0.48090517442178216  # pycocoevalcap Bleu(4), 4th value (it adds 1e-15/1e-9 epsilons)
COCO_CIDER = 2.9538221862967697   # pycocoevalcap Cider (CIDEr-D), corpus mean
COCO_CIDER_PER = [2.8610536383950746, 2.7370544283595426, 2.492090431839528,
                  3.388779231495685, 3.2901332013940205]

def test_tokenize_caption():
    assert tokenize_caption("A Dog's T-shirt, on 3.5 'big' mats!\n") == \
        ["a", "dogs", "t", "shirt", "on", "3", "5", "big", "mats"]
    assert tokenize_caption("  ...  ") == []

def test_matches_coco_caption_evaluation():
    b, _ = bleu4(CANDS, REFS)
    c, per = cider_d(CANDS, REFS)
    assert b == pytest.approx(COCO_BLEU4, abs=1e-9)
    assert c == pytest.approx(COCO_CIDER, abs=1e-9)
    assert per == pytest.approx(COCO_CIDER_PER, abs=1e-9)

def test_bleu_by_hand():
    # Papineni et al.'s example. Candidate "the cat sat on the mat" (6 words):
    #   1-grams the x2 (a reference has "the" twice -> both count), cat, on, mat match; sat not: 5/6
    #   2-grams "the cat", "on the", "the mat" match of 5: 3/5;  3-grams "on the mat": 1/4;  4-grams 0/3
    #   closest reference length 6 (vs 7) -> no brevity penalty
    # plus an exact copy of a 6-word reference: 6/6, 5/5, 4/4, 3/3.
    cands = ["the cat sat on the mat", "a dog runs in the park"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs in the park"]]
    corpus, per = bleu4(cands, refs)
    # corpus: (5+6)/12, (3+5)/10, (1+4)/8, (0+3)/6; lengths 12 vs 12 -> BP 1
    assert corpus == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-12)
    # sentence: the 4-gram zero is smoothed to 0.1/3 (Chen & Cherry method 1)
    assert per[0] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25, abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)

def test_bleu_brevity_penalty_closest_length():
    # every candidate n-gram matches, so BLEU is just the brevity penalty. Closest reference
    # lengths: 6 words -> 7 (not 4); 4 words -> 3 and 5 tie -> the shorter, 3; 2 words -> 6.
    # c = 12, r = 16 -> exp(1 - 16/12). pycocoevalcap gives 0.7165313104046085 (tie to 5 would give exp(-1/2)).
    cands = ["a dog runs in the park", "a big red dog", "the cat"]
    refs = [["a dog runs in the park today", "a big dog runs"], ["a big dog", "a big red dog runs"],
            ["the cat sat on a mat"]]
    corpus, per = bleu4(cands, refs)
    assert corpus == pytest.approx(math.exp(-1 / 3), abs=1e-12)
    assert corpus == pytest.approx(0.7165313104046085, abs=1e-9)
    assert per[0] == pytest.approx(math.exp(1 - 7 / 6), abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)
    # "the cat": 2/2, 1/1, no 3- or 4-grams -> 0.1 each; BP exp(1 - 6/2)
    assert per[2] == pytest.approx(0.01 ** 0.25 * math.exp(-2), abs=1e-12)

def test_cider_d_by_hand():
    # three images, one reference each: "red circle", "blue square", "green circle".
    # IDF = log(3) - log(df): "circle" is in 2 of 3 reference sets -> log 1.5; every other
    # n-gram (including "shape", in no reference: df counts as 1) -> log 3. Captions have no
    # 3-/4-grams, so those orders add 0 and the 1/4 average over n still divides by 4.
    L3, L15 = math.log(3), math.log(1.5)
    cands = ["red circle", "blue circle shape", "circle circle"]
    refs = [["red circle"], ["blue square"], ["green circle"]]
    mean, per = cider_d(cands, refs)
    # 1: identical -> cosine 1 for n = 1 and 2 -> 10 * 2/4
    assert per[0] == pytest.approx(5.0, abs=1e-12)
    # 2: only "blue" shared; one word longer -> exp(-1 / (2 * 6^2))
    cos = L3 * L3 / (math.sqrt(2 * L3 ** 2 + L15 ** 2) * math.sqrt(2) * L3)
    assert per[1] == pytest.approx(10 / 4 * cos * math.exp(-1 / 72), abs=1e-12)
    # 3: "circle" twice is clipped to the reference's once: min(2, 1) * L15 * L15
    cos = L15 * L15 / (2 * L15 * math.sqrt(L3 ** 2 + L15 ** 2))
    assert per[2] == pytest.approx(10 / 4 * cos, abs=1e-12)
    assert mean == pytest.approx(sum(per) / 3, abs=1e-12)
    assert mean == pytest.approx(2.208536957076924, abs=1e-9)  # pycocoevalcap Cider

def test_identical_scores_max_and_unrelated_near_zero():
    refs = [[c] for c in CANDS]
    b, b_per = bleu4(CANDS, refs)
    c, c_per = cider_d(CANDS, refs)
    assert b == pytest.approx(1.0, abs=1e-12) and b_per == pytest.approx([1.0] * 5, abs=1e-12)
    assert c == pytest.approx(10.0, abs=1e-9) and c_per == pytest.approx([10.0] * 5, abs=1e-9)
    # any other caption scores below the identical one in the same corpus
    assert cider_d(["a man riding a wave"] + CANDS[1:], refs)[1][0] < 10.0
    # unrelated captions share only "a", which is in every reference set (IDF 0)
    junk = ["a purple elephant juggling three umbrellas"] * 5
    b, b_per = bleu4(junk, REFS)
    c, c_per = cider_d(junk, REFS)
    assert b == 0.0 and max(b_per) < 0.05
    assert c == pytest.approx(0.0, abs=1e-12)

def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 candidates but 1"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        cider_d(["a cat"], [[]])
    assert cider_d(["a cat"], ["a cat"])[0] == 0.0  # one-image corpus: every IDF is log(1) = 0

def test_hallucination_rate():
    cands = [
        "A dog and a cat sitting on a couch.",        # cat is not in the reference
        "Two red circles and a yellow star.",         # plural circle is fine, the star is not
        "A man eating a hot dog.",                    # a hot dog is not a dog; man == person
        "An orange square on a grey background.",     # orange is a colour, not the fruit
        "A photo of the sky at night.",               # names no object
    ]
    refs = [
        ["A dog sitting on a sofa."],
        ["A red circle and a blue square.", "Two circles, one red."],
        ["A person holding a hot dog."],
        ["An orange square."],
        ["The night sky."],
    ]
    summary, per = hallucination_rate(cands, refs)
    assert per == [["cat"], ["star"], [], [], []]
    assert summary["objects_mentioned"] == 3 + 2 + 2 + 1 + 0
    assert summary["chair_i"] == pytest.approx(2 / 8)
    assert summary["chair_s"] == pytest.approx(2 / 5)
    # irregular plurals and -ies plurals map to the same object as the singular
    assert hallucination_rate(["three knives and two ladies"], [["a knife held by a woman"]])[1] == [[]]
    # a plain word list works as a vocabulary
    summary, per = hallucination_rate(["a cat and a dog"], [["a cat"]], vocab=["cat", "dog"])
    assert per == [["dog"]] and summary["chair_s"] == 1.0
    assert all(w in OBJECT_WORDS for w in ["circle", "square", "triangle", "diamond", "star", "cross"])

def test_qa_scores():
    preds = ["A red circle.", "There is a blue square in the image", "the dog", "Cat",
             "a bluesquare", "scattered leaves"]
    answers = [["a red circle"], "blue square", ["dog", "puppy"], ["a cat"], ["blue square"], ["cat"]]
    q = qa_scores(preds, answers)
    assert q["exact_per_sample"] == [True, False, True, True, False, False]
    assert q["contains_per_sample"] == [True, True, True, True, False, False]
    assert q["exact"] == pytest.approx(3 / 6) and q["contains"] == pytest.approx(4 / 6) and q["n"] == 6
    # an answer that normalises to nothing never matches
    assert qa_scores([""], [["the"]])["contains_per_sample"] == [False]

def test_length_stats():
    ls = length_stats(["one two three", "a b c d e f g h i j k l"], [["w " * 5, "w " * 25], ["w " * 70]])
    g, r = ls["generated"], ls["references"]
    assert ls["bins"][0] == "0-4" and ls["bins"][-1] == "60+" and len(ls["bins"]) == len(g["hist"])
    assert g["n"] == 2 and g["mean"] == 7.5 and g["median"] == 7.5
    assert g["p10"] == pytest.approx(3 + 0.1 * 9) and g["p90"] == pytest.approx(3 + 0.9 * 9)
    assert g["hist"] == [1, 0, 1, 0, 0, 0, 0, 0]
    assert r["hist"] == [0, 1, 0, 0, 1, 0, 0, 1] and r["n"] == 3

def test_write_report(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(img_dir / "red.jpg")
    Image.new("L", (50, 300), 128).save(img_dir / "grey.png")
    (img_dir / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        {"id": "r0", "image": str(img_dir / "red.jpg"), "prompt": "<image>\nDescribe the image.",
         "generation": "A red square.", "references": ["A red square on a white background."]},
        {"id": "r|1", "image": str(img_dir / "grey.png"), "prompt": "p",
         "generation": "A grey bar with a dog.", "references": ["A grey rectangle."]},
        {"id": "r2", "image": str(img_dir / "missing.jpg"), "prompt": "p",
         "generation": "Nothing.", "references": ["A blue circle."]},
        {"id": "r3", "image": str(img_dir / "broken.jpg"), "prompt": "p",
         "generation": "A cat.", "references": ["A cat."]},
        {"id": "r4", "pil": Image.new("RGBA", (300, 300), (0, 0, 255, 128)), "prompt": "p",
         "generation": "A blue circle.", "references": ["A blue circle."]},
        {"id": "q0", "image": [str(img_dir / "red.jpg"), str(img_dir / "grey.png")],
         "prompt": "What is in the image?", "generation": "a red square", "answers": ["red square"]},
    ]
    metrics = {"val": score_rows(rows[:5]), "qa": score_rows(rows[5:]), "llm_untouched": True}
    out = tmp_path / "report"
    path = write_report(str(out), rows, metrics)
    assert path == str(out / "report.md")

    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    first = json.loads(lines[0])
    assert list(first)[:5] == ["id", "image", "prompt", "generation", "references"]
    assert {"bleu4", "cider_d", "hallucinated"} <= set(first)
    assert json.loads(lines[1])["hallucinated"] == ["dog"]
    assert json.loads(lines[4])["image"] is None and "pil" not in json.loads(lines[4])
    assert json.loads(lines[5])["exact"] is True

    md = (out / "report.md").read_text()
    assert "val.cider_d" in md and "val.bleu4" in md and "qa.qa_exact" in md and "llm_untouched" in md
    assert "Caption length in words: val.length" in md
    assert "r\\|1" in md  # a pipe in a cell must not split the table row
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # red, grey, the PIL image, and both images of the two-image row; missing/broken skipped
    assert len(links) == 5
    for link in links:
        assert not os.path.isabs(link) and link.startswith("thumbs/")
        with Image.open(out / link) as im:
            assert im.format == "JPEG" and max(im.size) == 128
    assert sorted(os.listdir(out / "thumbs")) == sorted(os.path.basename(l) for l in links)
