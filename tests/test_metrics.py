"""
Tests of evaluation/metrics.py: BLEU-4 / CIDEr-D against the COCO caption evaluation code, CHAIR object
hallucination, strict QA accuracy, caption lengths, score_rows.

$ python -m pytest -q tests/test_metrics.py          # about a second, no torch needed
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.metrics import (OBJECT_WORDS, bleu4, bleu_scores, cider_d, hallucination_rate, length_stats, qa_scores,
                     rouge_l, score_rows, tokenize_caption)

ROOT = Path(__file__).resolve().parent.parent  # the repository

# A fixed 5-image corpus. Reference numbers below come from pycocoevalcap 1.2 (PyPI wheel;
# Bleu(4) and Cider, which are pure Python), fed the output of tokenize_caption joined by
# spaces, since that toolkit expects pre-tokenized text. Not a dependency of this repo.
CANDS = [
    'A man riding a surfboard on a wave.',
    'Two dogs playing in the grass with a ball.',
    'A plate of rice and broccoli on a table.',
    'A red circle and a green triangle on a white background.',
    'A red stop sign on a city street.',
]
REFS = [
    ['A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean.',
     'A person on a surfboard riding a wave.'],
    ['Two dogs playing with a frisbee in the grass.', 'A couple of dogs play in a grassy field.',
     'Two brown dogs running on the grass with a frisbee.'],
    ['A plate of food with broccoli and rice.', 'A white plate topped with rice and broccoli.',
     'A close up of a plate of food.'],
    ['A red circle and a blue square on a white background.', 'A red circle to the left of a blue square.'],
    ['A stop sign on the corner of a street.', 'A red stop sign next to a road.'],
]
COCO_BLEU4 = 0.48090517442178216  # pycocoevalcap Bleu(4), 4th value (it adds 1e-15/1e-9 epsilons)
COCO_CIDER = 2.9538221862967697   # pycocoevalcap Cider (CIDEr-D), corpus mean
COCO_CIDER_PER = [2.8610536383950746, 2.7370544283595426, 2.492090431839528,
                  3.388779231495685, 3.2901332013940205]
T, S = 1e-15, 1e-9  # pycocoevalcap's tiny and small: every ratio is (x + T) / (y + S)

# -----------------------------------------------------------------------------
# tokenization, BLEU-4, CIDEr-D

def test_tokenize_caption():
    assert tokenize_caption("A Dog's T-shirt, on 3.5 'big' mats!\n") == \
        ['a', 'dogs', 't', 'shirt', 'on', '3', '5', 'big', 'mats']
    assert tokenize_caption('  ...  ') == []

def test_matches_coco_caption_evaluation():
    b, _ = bleu4(CANDS, REFS)
    c, per = cider_d(CANDS, REFS)
    assert b == pytest.approx(COCO_BLEU4, abs=1e-9)
    assert c == pytest.approx(COCO_CIDER, abs=1e-9)
    assert per == pytest.approx(COCO_CIDER_PER, abs=1e-9)

def test_bleu_credits_a_word_as_often_as_its_most_generous_reference():
    """Clipped counts: "the" in the candidate counts at most as often as in the one reference
    that has it most, not as often as in all references together."""
    cand = ['the the the the']
    one, two = bleu4(cand, [['the cat']]), bleu4(cand, [['the cat', 'the dog']])
    assert two[0] == pytest.approx(one[0], rel=1e-9) and two[1][0] == pytest.approx(one[1][0], rel=1e-9)
    more = bleu4(cand, [['the the cat']])  # a reference with "the" twice: more credit
    assert more[1][0] > one[1][0]


def test_bleu_by_hand():
    # Papineni et al.'s example. Candidate "the cat sat on the mat" (6 words):
    #   1-grams the x2 (a reference has "the" twice -> both count), cat, on, mat match; sat not: 5/6
    #   2-grams "the cat", "on the", "the mat" match of 5: 3/5;  3-grams "on the mat": 1/4;  4-grams 0/3
    #   closest reference length 6 (vs 7) -> no brevity penalty
    # plus an exact copy of a 6-word reference: 6/6, 5/5, 4/4, 3/3.
    cands = ['the cat sat on the mat', 'a dog runs in the park']
    refs = [['the cat is on the mat', 'there is a cat on the mat'], ['a dog runs in the park']]
    corpus, per = bleu4(cands, refs)
    # corpus: (5+6)/12, (3+5)/10, (1+4)/8, (0+3)/6; lengths 12 vs 12 -> BP 1 (pycocoevalcap's
    # epsilons move it by ~1e-10, hence 1e-9 rather than 1e-12)
    assert corpus == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-9)
    # sentence: the 4-gram zero is smoothed to 0.1/3 (Chen & Cherry method 1)
    assert per[0] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25, abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)

def test_bleu_brevity_penalty_closest_length():
    # every candidate n-gram matches, so BLEU is just the brevity penalty. Closest reference
    # lengths: 6 words -> 7 (not 4); 4 words -> 3 and 5 tie -> the shorter, 3; 2 words -> 6.
    # c = 12, r = 16 -> exp(1 - 16/12). pycocoevalcap gives 0.7165313104046085 (tie to 5 would give exp(-1/2)).
    cands = ['a dog runs in the park', 'a big red dog', 'the cat']
    refs = [['a dog runs in the park today', 'a big dog runs'], ['a big dog', 'a big red dog runs'],
            ['the cat sat on a mat']]
    corpus, per = bleu4(cands, refs)
    assert corpus == pytest.approx(math.exp(-1 / 3), abs=1e-9)
    assert corpus == pytest.approx(0.7165313104046085, abs=1e-9)
    assert per[0] == pytest.approx(math.exp(1 - 7 / 6), abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)
    # "the cat": 2/2, 1/1, no 3- or 4-grams -> 0.1 each; BP exp(1 - 6/2)
    assert per[2] == pytest.approx(0.01 ** 0.25 * math.exp(-2), abs=1e-12)

def test_bleu_without_any_4gram_match_is_small_not_zero():
    # "the cat sat on the mat" vs "the cat is on the mat": 5/6, 3/5, 1/4, 0/3 (as in test_bleu_by_hand)
    # "a dog runs fast" vs "a dog walks fast": 3/4, 1/3 ("a dog"), 0/2, 0/1
    # corpus: 8/10, 4/8, 1/6, 0/4, lengths 10 vs 10. pycocoevalcap:
    #   ((8+T)/(10+S) * (4+T)/(8+S) * (1+T)/(6+S) * (0+T)/(4+S)) ** (1/4)
    #   ~ (1/15 * 1e-15/4) ** (1/4) = (1 / 6e16) ** (1/4) ~ 6.389e-5
    #   times exp(1 - 1/ratio), ratio = (10+T)/(10+S) just under 1 -> exp(-1e-10)
    cands = ['the cat sat on the mat', 'a dog runs fast']
    refs = [['the cat is on the mat'], ['a dog walks fast']]
    ratio = (10 + T) / (10 + S)
    want = ((8 + T) / (10 + S) * (4 + T) / (8 + S) * (1 + T) / (6 + S) * T / (4 + S)) ** 0.25
    want *= math.exp(1 - 1 / ratio)
    corpus, per = bleu4(cands, refs)
    assert corpus == pytest.approx(want, rel=1e-12)
    assert corpus == pytest.approx(6.389431040798814e-05, rel=1e-9)  # pycocoevalcap
    assert per[1] == pytest.approx((3 / 4 * 1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25, abs=1e-12)  # no BP: 4 vs 4

def test_bleu_one_image_corpus_uses_closest_length():
    # every n-gram matches (4/4, 3/3, 2/2, 1/1). Closest reference length 5, not the average 7:
    # BP exp(1 - 5/4) = 0.7788 (the average would give exp(1 - 7/4) = 0.4724)
    cands, refs = ['a big red dog'], [['a big red dog runs', 'a big red dog runs fast in the park']]
    want = ((4 + T) / (4 + S) * (3 + T) / (3 + S) * (2 + T) / (2 + S) * (1 + T) / (1 + S)) ** 0.25
    want *= math.exp(1 - (5 + S) / (4 + T))
    corpus, per = bleu4(cands, refs)
    assert corpus == pytest.approx(want, rel=1e-12)
    assert corpus == pytest.approx(math.exp(-0.25), abs=1e-9)
    assert per == [pytest.approx(math.exp(-0.25), abs=1e-12)]

def test_empty_corpus():
    # an empty set is 'not measured' (None), never a number that reads as a result
    assert bleu4([], []) == (None, [])
    assert bleu4([''], [['a cat']]) == (0.0, [0.0])  # BP exp(1 - (2 + S) / T) underflows to 0
    assert cider_d([], []) == (None, [])
    summary, per = hallucination_rate([], [])
    assert per == [] and summary['chair_i'] is None and summary['chair_s'] is None and summary['captions'] == 0
    summary, _ = hallucination_rate(['a red shape.'], [['a blue shape.']])  # no object named anywhere
    assert summary['chair_i'] is None and summary['chair_s'] == 0.0
    assert qa_scores([], [])['accuracy'] is None and qa_scores([], [])['n'] == 0
    assert length_stats([], [])['generated']['n'] == 0
    assert score_rows([]) == {}

def test_cider_d_by_hand():
    # three images, one reference each: "red circle", "blue square", "green circle".
    # IDF = log(3) - log(df): "circle" is in 2 of 3 reference sets -> log 1.5; every other
    # n-gram (including "shape", in no reference: df counts as 1) -> log 3. Captions have no
    # 3-/4-grams, so those orders add 0 and the 1/4 average over n still divides by 4.
    L3, L15 = math.log(3), math.log(1.5)
    cands = ['red circle', 'blue circle shape', 'circle circle']
    refs = [['red circle'], ['blue square'], ['green circle']]
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
    assert b == pytest.approx(1.0, abs=1e-9) and b_per == pytest.approx([1.0] * 5, abs=1e-12)
    assert c == pytest.approx(10.0, abs=1e-9) and c_per == pytest.approx([10.0] * 5, abs=1e-9)
    # any other caption scores below the identical one in the same corpus
    assert cider_d(['a man riding a wave'] + CANDS[1:], refs)[1][0] < 10.0
    # unrelated captions share only "a", which is in every reference set (IDF 0)
    junk = ['a purple elephant juggling three umbrellas'] * 5
    b, b_per = bleu4(junk, REFS)
    c, c_per = cider_d(junk, REFS)
    assert 0.0 < b < 1e-12 and max(b_per) < 0.05  # pycocoevalcap: 2.503e-13, its epsilons
    assert c == pytest.approx(0.0, abs=1e-12)

def test_metric_input_errors():
    with pytest.raises(ValueError, match='2 candidates but 1'):
        bleu4(['a', 'b'], [['a']])
    with pytest.raises(ValueError, match='no reference'):
        cider_d(['a cat'], [[]])
    assert cider_d(['a cat'], ['a cat'])[0] == 0.0  # one-image corpus: every IDF is log(1) = 0

# -----------------------------------------------------------------------------
# CHAIR object hallucination

def mentions(caption):
    """(number of object mentions, sorted distinct objects) in one caption"""
    summary, per = hallucination_rate([caption], [['']])
    return summary['objects_mentioned'], per[0]

def test_hallucination_rate():
    cands = [
        'A dog and a cat sitting on a couch.',        # cat is not in the reference
        'Two red circles and a yellow star.',         # plural circle is fine, the star is not
        'A man eating a hot dog.',                    # a hot dog is not a dog; man == person
        'An orange square on a grey background.',     # orange is a colour, not the fruit
        'A photo of the sky at night.',               # names no object
    ]
    refs = [
        ['A dog sitting on a sofa.'],
        ['A red circle and a blue square.', 'Two circles, one red.'],
        ['A person holding a hot dog.'],
        ['An orange square.'],
        ['The night sky.'],
    ]
    summary, per = hallucination_rate(cands, refs)
    assert per == [['cat'], ['star'], [], [], []]
    assert summary['objects_mentioned'] == 3 + 2 + 2 + 1 + 0
    assert summary['chair_i'] == pytest.approx(2 / 8)
    assert summary['chair_s'] == pytest.approx(2 / 5)
    # irregular plurals and -ies plurals map to the same object as the singular
    assert hallucination_rate(['three knives and two ladies'], [['a knife held by a woman']])[1] == [[]]
    # a plain word list works as a vocabulary
    summary, per = hallucination_rate(['a cat and a dog'], [['a cat']], vocab=['cat', 'dog'])
    assert per == [['dog']] and summary['chair_s'] == 1.0
    assert all(w in OBJECT_WORDS for w in ['circle', 'square', 'triangle', 'diamond', 'star', 'cross'])

def test_chair_i_counts_every_mention():
    summary, per = hallucination_rate(['a dog and another dog and a cat', 'a cat, a cat and a dog'],
                                      [['a dog on a sofa'], ['a puppy']])
    assert per == [['cat'], ['cat']]
    assert summary['objects_mentioned'] == 6 and summary['objects_hallucinated'] == 1 + 2
    assert summary['chair_i'] == pytest.approx(3 / 6) and summary['chair_s'] == 1.0

def test_chair_ground_truth_is_every_reference():
    cand = 'A surfer and his dog ride a wave on a surfboard.'
    one = ['A man riding a wave.']
    three = one + ['A dog on a surfboard with its owner.', 'A surfer and a puppy in the ocean.']
    assert hallucination_rate([cand], [one])[1] == [['dog', 'surfboard']]
    summary, per = hallucination_rate([cand], [three])
    assert per == [[]] and summary['objects_mentioned'] == 3 and summary['chair_s'] == 0.0

@pytest.mark.parametrize('caption, objects', [
    ('a man crosses the street', ['person']),       # the verb, not the shape
    ('two kids cross the road', ['person']),
    ('a crossing near the school', []),
    ('a crowd in times square', []),
    ('the town square at night', []),
    ('a fountain in the city square', []),
    ('a 500 square feet flat', []),
    ('ten square meters of floor', []),
    ('a bottle cap on the floor', []),
    ('a star shaped cookie', []),
    ('a star-shaped cookie', []),
    ('a train station at dusk', []),
    ('people at the bus stop', ['person']),
    ('a tie dye shirt', []),
    ('a baseball diamond', []),
    ('a man eating a hot dog', ['hot dog', 'person']),
    ('a teddy bear on a shelf', ['teddy bear']),
    ('a baseball bat', ['baseball bat']),
])
def test_chair_phrases_that_name_no_object(caption, objects):
    assert mentions(caption)[1] == objects

@pytest.mark.parametrize('word, obj', [
    ('rider', 'person'), ('pitcher', 'person'), ('batter', 'person'), ('catcher', 'person'),
    ('snowboarder', 'person'), ('cyclist', 'person'), ('pedestrian', 'person'), ('policeman', 'person'),
    ('chef', 'person'), ('toddler', 'person'), ('bride', 'person'), ('van', 'car'), ('minivan', 'car'),
    ('jeep', 'car'), ('suv', 'car'), ('cab', 'car'), ('limo', 'car'), ('sailboat', 'boat'), ('ferry', 'boat'),
    ('raft', 'boat'), ('scooter', 'motorcycle'), ('moped', 'motorcycle'), ('dirt bike', 'motorcycle'),
    ('mountain bike', 'bicycle'), ('calf', 'cow'), ('bull', 'cow'), ('ox', 'cow'), ('lamb', 'sheep'),
    ('ram', 'sheep'), ('pony', 'horse'), ('foal', 'horse'), ('stallion', 'horse'), ('seagull', 'bird'),
    ('goose', 'bird'), ('swan', 'bird'), ('parrot', 'bird'), ('owl', 'bird'), ('pickup truck', 'truck'),
    ('lorry', 'truck'), ('jet', 'airplane'), ('airliner', 'airplane'), ('pit bull', 'dog'),
])
def test_chair_synonyms_ground_each_other(word, obj):
    assert OBJECT_WORDS[word] == obj
    summary, per = hallucination_rate([f'a {word} in the photo'], [[f'a {obj}']])
    assert per == [[]] and summary['objects_mentioned'] == 1

@pytest.mark.parametrize('plural, singular', [
    ('calves', 'calf'), ('knives', 'knife'), ('mice', 'mouse'), ('people', 'person'), ('men', 'man'),
    ('women', 'woman'), ('children', 'child'), ('geese', 'goose'), ('oxen', 'ox'), ('policemen', 'policeman'),
    ('ponies', 'pony'), ('buses', 'bus'), ('benches', 'bench'), ('boxes', 'box'), ('horses', 'horse'),
    ('hot dogs', 'hot dog'), ('sheep', 'sheep'),
])
def test_chair_plurals_map_to_the_singular(plural, singular):
    assert mentions(f'some {plural}') == (1, [OBJECT_WORDS[singular]])

def test_chair_plural_rules_do_not_invent_objects():
    # "-es" is undone only after a sibilant: "hates" is no hat, "cares" no car
    assert mentions('he hates what she cares about') == (0, [])

def test_chair_synthetic_crosses_are_the_shape():
    caps = ['three white crosses.', 'two red crosses and one blue star.', 'a red cross at the top.',
            'a pink cross in the center.']
    summary, per = hallucination_rate(caps, [[c] for c in caps])
    assert summary['objects_mentioned'] == 1 + 2 + 1 + 1 and per == [[], [], [], []]
    assert hallucination_rate(['two red crosses.'], [['two red stars.']])[1] == [['cross']]

# -----------------------------------------------------------------------------
# QA

def correct(pred, answers):
    return qa_scores([pred], [answers])['accuracy_per_sample'][0]

def test_qa_scores():
    preds = ['A red circle.', 'There is a blue square in the image', 'the dog', 'Cat',
             'a bluesquare', 'scattered leaves']
    answers = [['a red circle'], 'blue square', ['dog', 'puppy'], ['a cat'], ['blue square'], ['cat']]
    q = qa_scores(preds, answers)
    assert q['exact_per_sample'] == [True, False, True, True, False, False]
    assert q['contains_per_sample'] == [True, True, True, True, False, False]
    assert q['exact'] == pytest.approx(3 / 6) and q['contains_lenient'] == pytest.approx(4 / 6) and q['n'] == 6
    assert q['accuracy_per_sample'] == [True, True, True, True, False, False]
    assert q['accuracy'] == pytest.approx(4 / 6)
    # an answer that normalises to nothing never matches
    assert qa_scores([''], [['the']])['contains_per_sample'] == [False]
    assert qa_scores([''], [['the']])['accuracy_per_sample'] == [False]

@pytest.mark.parametrize('pred, right', [
    ('red', True), ('a red circle at the top.', True), ('The circle is red.', True),
    ('it is not red', False), ('the circle isnt red', False), ('no red', False),
    ('red and blue and green', False),              # every colour named: contains_lenient would pass it
    ('red or blue', False),
    ('a red circle and a blue square', False),      # strict: another colour anywhere is wrong
    ('blue', False),
])
def test_qa_accuracy_colour_question(pred, right):
    # "What color is the circle?"
    assert correct(pred, ['red']) is right
    assert qa_scores([pred], [['red']])['contains_per_sample'][0] is ('red' in pred)

def test_qa_accuracy_rejects_degenerate_output():
    assert not correct('red red red', ['red'])
    assert not correct('a red, red, red circle', ['red circle'])
    assert correct('red red', ['red'])  # two in a row is still an answer

@pytest.mark.parametrize('pred, answers, exact', [
    ('2', ['two'], True), ('two', ['2'], True), ('there are 2 squares', ['two', '2'], False),
    ('circles', ['circle'], True), ('a circle', ['circles'], True), ('crosses', ['cross'], True),
    ('boxes', ['box'], True), ('grey', ['gray'], True), ('a gray square', ['grey'], False),
    ('three white crosses.', ['white crosses'], False),
])
def test_qa_normalises_numbers_plurals_grey(pred, answers, exact):
    assert correct(pred, answers)
    assert qa_scores([pred], [answers])['exact_per_sample'][0] is exact

@pytest.mark.parametrize('pred, right', [
    ('2', True), ('there are two circles.', True), ('two or three', False), ('not two', False),
    ('three', False), ('two circles and one square', False),  # strict: another count anywhere is wrong
])
def test_qa_accuracy_count_question(pred, right):
    # "How many circles are there?"
    assert correct(pred, ['two', '2']) is right

@pytest.mark.parametrize('pred, right', [
    ('two blue squares and one red circle.', True),   # "red circle" (no count) is one circle
    ('a red circle', True),
    ('two blue squares', True),
    ('a red circle and a green star', False),          # green, star: not in any answer
    ('three blue squares', False),                      # no accepted answer in it
    ('there is no red circle', False),
])
def test_qa_accuracy_what_question_with_several_answers(pred, right):
    # "What is in the image?"
    assert correct(pred, ['red circle', 'two blue squares']) is right

def test_qa_accuracy_what_question_without_counts_allows_any_count():
    # the synthetic QA set's answers name no count, so counts are not checked
    assert correct('two blue squares and one red circle.', ['red circle', 'blue squares'])
    assert correct('blue squares and a red circle', ['red circle', 'blue squares'])
    # where one answer gives a count, a count-less plural allows any count from two, a
    # count-less singular only one
    assert correct('two red circles and three blue squares', ['two red circles', 'blue squares'])
    assert not correct('two red circles and one blue square', ['two red circles', 'blue squares'])
    assert correct('two red circles and one blue square', ['two red circles', 'blue square'])


def test_qa_negation_reaches_three_words_back():
    assert not correct('it is not very dark red', ['red'])
    assert correct('not a circle, it is very dark red', ['red'])  # a negation further back is another clause

# -----------------------------------------------------------------------------
# lengths, score_rows, imports

def test_length_stats():
    ls = length_stats(['one two three', 'a b c d e f g h i j k l'], [['w ' * 5, 'w ' * 25], ['w ' * 70]])
    g, r = ls['generated'], ls['references']
    assert ls['bins'][0] == '0-4' and ls['bins'][-1] == '60+' and len(ls['bins']) == len(g['hist'])
    assert g['n'] == 2 and g['mean'] == 7.5 and g['median'] == 7.5
    assert g['p10'] == pytest.approx(3 + 0.1 * 9) and g['p90'] == pytest.approx(3 + 0.9 * 9)
    assert g['hist'] == [1, 0, 1, 0, 0, 0, 0, 0]
    assert r['hist'] == [0, 1, 0, 0, 1, 0, 0, 1] and r['n'] == 3

def test_score_rows_attaches_per_row_scores_and_returns_summaries():
    rows = [{'generation': c, 'references': r} for c, r in zip(CANDS, REFS)] + [
        {'generation': 'a red circle', 'answers': ['red circle'], 'question': 'What is in the image?'},
        {'generation': 'red and blue', 'answers': ['red'], 'question': 'What color is the circle?'},
        {'generation': 'it is red', 'answers': ['red'], 'question': 'What colour is the star?'},
        {'generation': '2', 'answers': ['two', '2'], 'question': 'How many squares are there?'},
    ]
    m = score_rows(rows)
    assert set(m) == {'n_captions', 'bleu4', 'cider_d', 'chair_i', 'chair_s', 'length',
                      'n_qa', 'qa_accuracy', 'qa_exact', 'qa_contains_lenient', 'qa_by_kind'}
    assert m['n_captions'] == 5 and m['bleu4'] == pytest.approx(COCO_BLEU4, abs=1e-9)
    assert m['cider_d'] == pytest.approx(COCO_CIDER, abs=1e-9) and m['length'] == length_stats(CANDS, REFS)
    assert [r['cider_d'] for r in rows[:5]] == pytest.approx(COCO_CIDER_PER, abs=1e-9)
    assert rows[3]['hallucinated'] == ['triangle'] and 'bleu4' in rows[0]
    assert [(r['exact'], r['contains'], r['correct']) for r in rows[5:]] == \
        [(True, True, True), (False, True, False), (False, True, True), (True, True, True)]
    assert m['n_qa'] == 4 and m['qa_accuracy'] == 0.75 and m['qa_exact'] == 0.5 and m['qa_contains_lenient'] == 1.0
    assert m['qa_by_kind'] == {'color': 0.5, 'count': 1.0, 'what': 1.0}
    assert 'qa_by_kind' not in score_rows([{'generation': 'red', 'answers': ['red']}])

def test_bleu_1_to_4_share_one_brevity_penalty():
    b = bleu_scores(CANDS, REFS)
    assert b[3] == pytest.approx(COCO_BLEU4, abs=1e-12) and b[0] > b[1] > b[2] > b[3]
    # "a b c" against "a b c d": every n-gram matches, one brevity penalty exp(1 - 4/3) for all orders
    got = bleu_scores(['a b c'], [['a b c d']], tokenize=str.split)
    assert got[:3] == pytest.approx([math.exp(1 - 4 / 3)] * 3, rel=1e-8)

def test_rouge_l_by_hand():
    # LCS 3 of "a b c" in "a b c d e f": P 1, R 1/2 -> 2.44 * 0.5 / (0.5 + 1.44)
    mean, per = rouge_l(['a b c', 'x'], [['a b c d e f'], ['y']], tokenize=str.split)
    assert per == pytest.approx([2.44 * 0.5 / 1.94, 0.0]) and mean == pytest.approx(per[0] / 2)
    # precision and recall are each the best over the references, as the toolkit takes them: "a b"
    # has precision 1 against "a b c d" and recall 1 against "a", so F is 1 though no reference alone gives it
    assert rouge_l(['a b'], [['a b c d', 'a']], tokenize=str.split)[1][0] == pytest.approx(1.0)

def test_hallucination_against_given_ground_truth():
    summary, per = hallucination_rate(['a dog and a cat on a bench'], [['a photo']], truths=[{'dog'}])
    assert per == [['bench', 'cat']] and summary['objects_mentioned'] == 3 and summary['objects_hallucinated'] == 2
    summary, per = hallucination_rate(['a puppy'], [['x']], objects=lambda text: ['dog'] if 'pup' in text else [])
    assert per == [['dog']]

def test_imports_without_torch_numpy_transformers():
    code = "from evaluation import metrics; import sys; assert not any(m in sys.modules for m in ('torch', 'numpy', 'transformers'))"
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
