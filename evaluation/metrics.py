"""
Caption and QA metrics for the evaluation report, in pure Python (standard library only: the
report rows can be scored anywhere, and importing this module costs milliseconds).

  tokenize_caption     lowercase, punctuation dropped, split on whitespace
  bleu4, bleu_scores   corpus BLEU-4 / BLEU-1..4 equal to pycocoevalcap's Bleu(4), plus a smoothed BLEU per sentence
  cider_d              CIDEr-D equal to pycocoevalcap's Cider
  rouge_l              ROUGE-L equal to pycocoevalcap's Rouge
  hallucination_rate   CHAIR-i / CHAIR-s (Rohrbach et al. 2018), the references (or given objects) as ground truth
  qa_scores            short-answer QA: strict accuracy, exact match, and a lenient contains match
  length_stats         caption length distribution, generated vs references
  score_rows           all of the above on report rows: per-row scores and per-set summaries

Written from the published definitions; tests/test_metrics.py checks them against numbers
from the COCO caption evaluation code on fixed examples and against hand-worked ones. The
caption metrics take a `tokenize` function: the report's tokenize_caption by default, or
str.split on text the PTB tokenizer already split (coco_caption.py: the official scores).
"""
import math
import re
from bisect import bisect_right
from collections import Counter

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
    s = s.lower().replace("'", '').replace('\u2019', '')
    s = re.sub(r'[^\w\s]|_', ' ', s)  # \w keeps unicode letters and digits
    return s.split()

def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

def _check_pairs(candidates, references_list):
    # references may be given as one string per sample for convenience
    if len(candidates) != len(references_list):
        raise ValueError(f'{len(candidates)} candidates but {len(references_list)} reference sets')
    refs = [[r] if isinstance(r, str) else list(r) for r in references_list]
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f'sample {i} has no references (captions or answers)')
    return refs

# -----------------------------------------------------------------------------
# BLEU-4 (Papineni et al. 2002), corpus-level as in the COCO caption evaluation

# pycocoevalcap adds these to every ratio, so a corpus without a single 4-gram match scores a
# small positive number, not 0, and a length ratio of exactly 1 still gets a (1e-10) penalty
_TINY, _SMALL = 1e-15, 1e-9

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

def _bleu_corpus(matches, totals, c_len, r_len):
    # pycocoevalcap's arithmetic: a product of (correct + tiny) / (guess + small) over the
    # orders, its 4th root, then the brevity penalty from (c + tiny) / (r + small)
    p = 1.0
    for m, t in zip(matches, totals):
        p *= (m + _TINY) / (t + _SMALL)
    score = p ** (1.0 / len(matches))
    ratio = (c_len + _TINY) / (r_len + _SMALL)
    return score * math.exp(1.0 - 1.0 / ratio) if ratio < 1 else score

def _bleu_sentence(matches, totals, c_len, r_len):
    if c_len == 0:
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        if m == 0:
            # Chen & Cherry 2014, method 1: a zero match count becomes epsilon = 0.1 (an order
            # the candidate is too short to have counts as one miss), so a sentence without a
            # 4-gram match scores low but not 0. Kept small so unrelated captions stay near 0
            # (BLEU+1 would give ~0.2 to a 6-word caption sharing only "a" with its reference).
            m, t = 0.1, max(t, 1)
        log_p += math.log(m / t) / len(matches)
    bp = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)  # brevity penalty
    return bp * math.exp(log_p)

def bleu4(candidates, references_list, tokenize=tokenize_caption):
    """
    Returns (corpus BLEU-4, [sentence BLEU-4 per sample]).
    Corpus: equal to pycocoevalcap's Bleu(4) (its 4th value). Clipped n-gram matches and totals
    summed over the corpus, one brevity penalty from the summed candidate length and summed
    "closest" reference lengths (per sentence the reference length nearest the candidate's,
    ties to the shorter; pycocoevalcap's Bleu always asks for "closest", a one-image corpus
    too), geometric mean of the 1..4-gram precisions with its 1e-15 / 1e-9 smoothing.
    Per sample: unofficial, Chen & Cherry method-1 smoothed, for sorting and inspecting only
    (these do not average to the corpus score; report the corpus score).
    """
    scores, stats = _bleu_all(candidates, references_list, tokenize)
    return scores[3], [_bleu_sentence(*s) for s in stats]

def bleu_scores(candidates, references_list, tokenize=tokenize_caption):
    """[corpus BLEU-1, BLEU-2, BLEU-3, BLEU-4], equal to pycocoevalcap's Bleu(4) (its
    Bleu_1..Bleu_4): BLEU-n is the geometric mean of the first n precisions, with the one
    brevity penalty."""
    return _bleu_all(candidates, references_list, tokenize)[0]

def _bleu_all(candidates, references_list, tokenize):
    refs = _check_pairs(candidates, references_list)
    stats = [_bleu_stats(tokenize(c), [tokenize(r) for r in rs]) for c, rs in zip(candidates, refs)]
    if not stats:
        return [None] * 4, []  # an empty corpus is not measured, not a score of 0
    matches = [sum(s[0][n] for s in stats) for n in range(4)]
    totals = [sum(s[1][n] for s in stats) for n in range(4)]
    c_len, r_len = sum(s[2] for s in stats), sum(s[3] for s in stats)
    return [_bleu_corpus(matches[:n], totals[:n], c_len, r_len) for n in range(1, 5)], stats

# -----------------------------------------------------------------------------
# CIDEr-D (Vedantam, Zitnick, Parikh 2015), as in the COCO caption evaluation

def _tfidf(counts, df, log_num_images):
    vecs, norms = [], []
    for order in counts:
        # n-grams never seen in any reference get df 1, i.e. the largest IDF
        v = {g: tf * (log_num_images - math.log(max(1, df[g]))) for g, tf in order.items()}
        vecs.append(v)
        norms.append(math.sqrt(sum(x * x for x in v.values())))
    return vecs, norms

def cider_d(candidates, references_list, sigma=6.0, tokenize=tokenize_caption):
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
    cands = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in refs]
    counts = lambda toks: [_ngrams(toks, n) for n in range(1, 5)]
    ref_counts = [[counts(r) for r in rs] for rs in refs]
    # document frequency: in how many images' reference sets does each n-gram occur
    df = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for order in rc for g in order})
    log_num_images = math.log(max(1, len(refs)))

    scores = []
    for c, rs, rcs in zip(cands, refs, ref_counts):
        vc, nc = _tfidf(counts(c), df, log_num_images)
        total = 0.0
        for r, rc in zip(rs, rcs):
            vr, nr = _tfidf(rc, df, log_num_images)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                if nc[n] == 0 or nr[n] == 0:
                    continue  # caption shorter than n words, or all its n-grams are in every image
                # clipping tf * idf by the reference's tf * idf is clipping tf (same idf)
                dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                total += penalty * dot / (nc[n] * nr[n])
        scores.append(10.0 * total / (4 * len(rs)))
    return (sum(scores) / len(scores) if scores else None), scores

# -----------------------------------------------------------------------------
# ROUGE-L (Lin 2004), as in the COCO caption evaluation

def _lcs(a, b):
    # length of the longest common subsequence, bit-parallel (Hyyro 2004): one big-int step
    # per token of b instead of a len(a) x len(b) table, ~10x faster in pure Python
    masks = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count('1')

def rouge_l(candidates, references_list, beta=1.2, tokenize=tokenize_caption):
    """
    Returns (mean ROUGE-L, [per sample]), equal to pycocoevalcap's Rouge: per sample the
    largest LCS precision and the largest LCS recall over its references (each may come from
    a different reference), then F = (1 + beta^2) P R / (R + beta^2 P), beta 1.2.
    """
    refs = _check_pairs(candidates, references_list)
    scores = []
    for c, rs in zip(candidates, refs):
        ct = tokenize(c) or ['']  # the toolkit splits on ' ': an empty caption is one empty token
        p = r = 0.0
        for ref in rs:
            rt = tokenize(ref) or ['']
            lcs = _lcs(rt, ct)
            p, r = max(p, lcs / len(ct)), max(r, lcs / len(rt))
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return (sum(scores) / len(scores) if scores else None), scores

# -----------------------------------------------------------------------------
# object hallucination (CHAIR, Rohrbach et al. 2018, with the references as ground truth)

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')  # the synthetic dataset's (sources/synthetic.py)

# Canonical object -> its surface forms (comma separated, canonical first): the 80 COCO
# categories ("sports ball" -> ball, "potted plant" -> plant, "dining table" -> table) with
# synonyms in the spirit of CHAIR's published list, a few other frequent concrete caption
# nouns, and the synthetic shapes. Left out on purpose: "orange" (mostly a colour in captions,
# and colours are the synthetic set's main attribute) and "hair drier". Two-word entries such
# as "mountain bike" or "train car" make the phrase count once, as the right object.
_OBJECTS = {
    'person': 'person, people, human, man, men, woman, women, boy, girl, child, children, kid, baby, guy, lady, '
              'gentleman, adult, player, skier, surfer, snowboarder, skateboarder, skater, rider, pitcher, batter, '
              'catcher, umpire, cyclist, biker, bicyclist, pedestrian, policeman, policewoman, officer, cop, chef, '
              'cook, baker, worker, student, teenager, teen, toddler, infant, bride, groom, mother, father, mom, '
              'dad, son, daughter, passenger, driver, tourist, traveler, soldier, doctor, nurse, farmer, cowboy, '
              'fisherman, businessman, businesswoman, fireman, firefighter, athlete, spectator, customer, vendor, '
              'shopper, waiter, waitress, swimmer, jockey',
    'bicycle': 'bicycle, bike, mountain bike',
    'motorcycle': 'motorcycle, motorbike, motor bike, scooter, moped, dirt bike',
    'car': 'car, automobile, van, minivan, jeep, sedan, suv, taxi, cab, hatchback, limo, limousine, coupe',
    'airplane': 'airplane, aeroplane, plane, jet, airliner, aircraft, jetliner, seaplane, biplane',
    'bus': 'bus, busses, minibus', 'train': 'train, locomotive, tram, streetcar, train car',
    'truck': 'truck, pickup, pickup truck, lorry, firetruck',
    'boat': 'boat, ship, sailboat, yacht, canoe, kayak, ferry, raft, tugboat, speedboat, rowboat, motorboat, '
            'catamaran, jet ski',
    'traffic light': 'traffic light, stop light, stoplight, traffic signal', 'fire hydrant': 'fire hydrant, hydrant',
    'bird': 'bird, seagull, sea gull, gull, pigeon, duck, duckling, goose, swan, parrot, parakeet, crow, eagle, owl, '
            'hawk, sparrow, robin, finch, pelican, flamingo, penguin, ostrich, dove, peacock, heron, hen, rooster',
    'cat': 'cat, kitten, kitty, tabby',
    'dog': 'dog, puppy, pup, doggy, doggie, poodle, terrier, bulldog, pit bull, beagle, labrador, retriever, '
           'chihuahua, dachshund, collie, corgi, pug, german shepherd',
    'horse': 'horse, pony, foal, stallion, mare, colt', 'sheep': 'sheep, lamb, ram, ewe',
    'cow': 'cow, cattle, calf, bull, ox, heifer', 'bear': 'bear, grizzly', 'backpack': 'backpack, rucksack, knapsack',
    'umbrella': 'umbrella, parasol', 'handbag': 'handbag, hand bag, purse, pocketbook', 'tie': 'tie, necktie',
    'suitcase': 'suitcase, suit case, luggage', 'skis': 'skis, ski', 'snowboard': 'snowboard, snow board',
    'ball': 'ball, football, soccer ball', 'baseball bat': 'baseball bat, bat',
    'baseball glove': 'baseball glove, glove, mitt', 'skateboard': 'skateboard, skate board',
    'surfboard': 'surfboard, surf board', 'tennis racket': 'tennis racket, racket, racquet',
    'wine glass': 'wine glass, wineglass', 'cup': 'cup, mug, teacup', 'knife': 'knife, knives',
    'sandwich': 'sandwich, burger, hamburger, cheeseburger, panini', 'hot dog': 'hot dog, hotdog',
    'donut': 'donut, doughnut', 'cake': 'cake, cupcake, cheesecake', 'chair': 'chair, stool, armchair, high chair',
    'couch': 'couch, sofa, loveseat', 'plant': 'plant, potted plant, houseplant',
    'table': 'table, desk, dining table, coffee table', 'toilet': 'toilet, urinal', 'tv': 'tv, television',
    'laptop': 'laptop, computer, netbook', 'mouse': 'mouse, mice', 'remote': 'remote, remote control, controller',
    'phone': 'phone, cellphone, cell phone, smartphone, mobile phone, telephone, iphone', 'oven': 'oven, stove',
    'refrigerator': 'refrigerator, fridge', 'teddy bear': 'teddy bear, teddy', 'hat': 'hat, cap',
}
# objects that go by their own name only (COCO's, then other frequent concrete caption nouns)
_OBJECTS.update((w, w) for w in (
    'stop sign, parking meter, bench, elephant, zebra, giraffe, frisbee, kite, bottle, fork, spoon, bowl, banana, '
    'apple, broccoli, carrot, pizza, bed, keyboard, microwave, toaster, sink, book, clock, vase, scissors, toothbrush, '
    'tree, flower, building, house, window, door, lamp, mirror, pillow, box, basket, bag, shoe, flag, fence, guitar, '
    'bridge, tower, mountain, sign').split(', '))
_OBJECTS.update((s, s) for s in SHAPES)
OBJECT_WORDS = {w.strip(): obj for obj, words in _OBJECTS.items() for w in words.split(',')}

# plurals that no suffix rule undoes (the -men words are a rule: policemen, businessmen)
_IRREGULAR = {'people': 'person', 'men': 'man', 'women': 'woman', 'children': 'child', 'mice': 'mouse',
              'geese': 'goose', 'oxen': 'ox', 'calves': 'calf', 'knives': 'knife', 'halves': 'half',
              'leaves': 'leaf', 'loaves': 'loaf', 'shelves': 'shelf', 'wolves': 'wolf', 'wives': 'wife',
              'feet': 'foot', 'teeth': 'tooth'}

# Phrases that contain an object word but name no object. At each position they are checked
# before the object lookup (longest phrase first) and skipped whole, plurals found as for
# objects ("bus stops", "square meters"). "crossing", "crossed" need no entry: they are not
# object words. Known limits, shared with CHAIR: no negation ("no dogs" still names a dog), and
# word sense only as far as these phrases go ("a remote area" names a remote, a water pitcher
# a person). The synthetic captions use "crosses" as the shape's plural ("three white
# crosses."), so only "cross" followed by what is crossed is the verb: never "at" or "in"
# ("a red cross at the top", "in the center").
_NOT_OBJECTS = set(
    'town square, city square, times square, public square, market square, village square, square foot, '
    'square meter, square metre, square mile, square inch, square yard, bottle cap, train station, '
    'train track, train platform, bus stop, bus station, tie dye, tie dyed, baseball diamond, traffic circle, '
    'ski slope, ski lift, ski resort, power plant, cross country, cross legged, cross section'.split(', '))
_NOT_OBJECTS |= {f'{s} shaped' for s in SHAPES}
_NOT_OBJECTS |= {f'{v} {w}' for v in ('cross', 'crosses', 'crossed', 'crossing')
                 for w in ('the', 'a', 'an', 'over', 'through', 'this', 'that', 'its', 'his', 'her', 'their')}

def _singular_forms(word):
    # the word, then what its singular may be: irregular, -men -> -man, -ies -> -y, -es only
    # after a sibilant (crosses, boxes, benches, buses), -s. So "hates" is not a hat and
    # "horses" is a horse, not a "hors".
    yield word
    if word in _IRREGULAR:
        yield _IRREGULAR[word]
    if word.endswith('men'):
        yield word[:-3] + 'man'
    if word.endswith('ies'):
        yield word[:-3] + 'y'
    if word.endswith('es') and word[:-2].endswith(('s', 'x', 'z', 'ch', 'sh')):
        yield word[:-2]
    if word.endswith('s'):
        yield word[:-1]

def _lookup(phrase, table):
    # the form of phrase (its last word singularised if need be) that table holds, else None
    head, _, last = phrase.rpartition(' ')
    for w in _singular_forms(last):
        key = f'{head} {w}' if head else w
        if key in table:
            return key
    return None

def _objects_in(tokens, vocab, longest=3):
    """the canonical object of every mention in tokens, in order, repeats kept (CHAIR-i counts mentions)"""
    found, i = [], 0
    while i < len(tokens):
        step = 1
        # longest phrase first, so a "hot dog" is not a dog and a "teddy bear" not a bear
        for n in range(min(longest, len(tokens) - i), 0, -1):
            phrase = ' '.join(tokens[i:i + n])
            if _lookup(phrase, _NOT_OBJECTS):
                step = n
                break
            key = _lookup(phrase, vocab)
            if key is not None:
                found.append(vocab[key])
                step = n
                break
        i += step
    return found

def objects_in(caption, vocab=OBJECT_WORDS):
    """The canonical object of every mention in a caption, in order, repeats kept."""
    longest = _LONGEST.get(id(vocab))
    if longest is None:  # the longest phrase, in words: computed once per vocabulary
        longest = _LONGEST[id(vocab)] = max(k.count(' ') + 1 for k in list(vocab) + list(_NOT_OBJECTS))
    return _objects_in(tokenize_caption(caption), vocab, longest)

_LONGEST = {}

def hallucination_rate(candidates, references_list, vocab=OBJECT_WORDS, truths=None, objects=None):
    """
    CHAIR (Rohrbach et al. 2018): objects a generation mentions that are absent from the
    sample's ground truth, the objects named in any of its references. Returns
    (summary, [sorted distinct hallucinated objects per sample]) where summary has
      chair_i: hallucinated mentions / object mentions ("a dog and another dog and a cat" with
               ground truth {dog}: 3 mentions, 1 hallucinated)
      chair_s: captions with at least one hallucinated mention / captions
    and the raw counts. vocab maps surface words/phrases to canonical objects (a plain list of
    words also works); synonyms map to one object, so "puppy" in the generation is grounded by
    "dog" in a reference. CHAIR proper also uses the COCO segmentations; here the references
    are the only ground truth, so an object present in the image but in no reference counts.
    truths: one set of canonical objects per sample to use as the ground truth instead (CHAIR
    as published on COCO: the image's segmented objects and its captions' objects).
    objects: a function caption -> canonical objects mentioned, instead of the vocab lookup.
    """
    refs = _check_pairs(candidates, references_list)
    if not isinstance(vocab, dict):
        vocab = {w: w for w in vocab}
    objects = objects or (lambda text: objects_in(text, vocab))
    per_sample = []
    mentioned = hallucinated = captions_with = 0
    for k, (c, rs) in enumerate(zip(candidates, refs)):
        truth = set(truths[k]) if truths is not None else {o for r in rs for o in objects(r)}
        gen = objects(c)
        bad = [o for o in gen if o not in truth]
        per_sample.append(sorted(set(bad)))
        mentioned += len(gen)
        hallucinated += len(bad)
        captions_with += bool(bad)
    n = len(per_sample)
    # no object mentioned (or no caption): CHAIR is not measured, rather than a perfect 0
    summary = {'chair_i': hallucinated / mentioned if mentioned else None, 'chair_s': captions_with / n if n else None,
               'objects_mentioned': mentioned, 'objects_hallucinated': hallucinated,
               'captions_with_hallucination': captions_with, 'captions': n}
    return summary, per_sample

# -----------------------------------------------------------------------------
# short-answer QA ("What is in the image?", "What color is the circle?", "How many ...?")

_ARTICLES = {'a', 'an', 'the'}
_NUMBERS = {w: str(i) for i, w in enumerate('zero one two three four five six seven eight nine ten'.split())}
_NEGATIONS = set('not no never without none nor neither nothing isnt arent wasnt werent dont doesnt didnt '
                 'cannot cant'.split())
# the kinds of answer word that must not be hedged: a prediction may name only those of a
# kind that the accepted answers name. Counts are any number (words become digits).
COLOURS = set('red green blue yellow purple orange white black pink brown gray grey tan cyan magenta violet beige '
              'turquoise teal maroon navy gold silver'.split())
_SHAPE_WORDS = set(SHAPES) | {'rectangle', 'oval', 'pentagon', 'hexagon'}
_KINDS = (COLOURS.__contains__, _SHAPE_WORDS.__contains__, str.isdigit)
_NOUNS = {w for w in OBJECT_WORDS if ' ' not in w} | _SHAPE_WORDS

def _singular(word):
    # a known noun's singular first ("skis" -> "ski", "buses" -> "bus", "men" -> "man"), then
    # the regular rules, guarded so "is", "bus", "glass", "this" stay themselves
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for w in list(_singular_forms(word))[1:] + [word]:
        if w in _NOUNS:
            return w
    if len(word) > 4 and word.endswith('ies'):
        return word[:-3] + 'y'
    if word.endswith(('sses', 'xes', 'ches', 'shes')):
        return word[:-2]
    if len(word) > 3 and word.endswith('s') and not word.endswith(('ss', 'us', 'is')):
        return word[:-1]
    return word

def _normalize(s):
    # tokenize_caption, no articles, "two" == "2", "circles" == "circle", "grey" == "gray"
    toks = (_singular(_NUMBERS.get(t, t)) for t in tokenize_caption(s) if t not in _ARTICLES)
    return ['gray' if t == 'grey' else t for t in toks]

def _allowed_counts(accepted):
    # the numbers the answers give, plus what a count-less answer implies when another gives
    # one: ['red circle', 'two blue squares'] allows "one red circle"; "blue squares" any from 2
    allowed = {t for a in accepted for t in _normalize(a) if t.isdigit()}
    for a in accepted:
        toks = [_NUMBERS.get(t, t) for t in tokenize_caption(a)]
        if allowed and not any(t.isdigit() for t in toks):
            for t in toks:
                if _singular(t) in _NOUNS:
                    allowed |= {'1'} if _singular(t) == t else {str(k) for k in range(2, 11)}
    return allowed

def _qa_correct(pred, accepted):
    """strict accuracy of one prediction; accepted: the sample's answer strings"""
    p = _normalize(pred)
    answers = [a for a in map(_normalize, accepted) if a]
    if any(p[i] == p[i + 1] == p[i + 2] for i in range(len(p) - 2)):
        return False  # degenerate output ("red red red") scores nothing, whatever it contains
    # an accepted answer as a whole-word phrase, without a negation in the 3 tokens before it
    # (strict: "no, it is red" counts as negated)
    if not any(p[i:i + len(a)] == a and not _NEGATIONS & set(p[max(0, i - 3):i])
               for a in answers for i in range(len(p) - len(a) + 1)):
        return False
    # no hedging: every colour / shape / count in the prediction must be one the answers name
    # (only for the kinds they name). Strict on purpose: "a red circle and a blue square" to
    # "What color is the circle?" is wrong, and so is "red, not blue" and "two circles, the red
    # one ..." to "How many circles?": a wrong "right" would overstate the model, a wrong
    # "wrong" only understates it.
    for is_kind in _KINDS:
        allowed = {t for a in answers for t in a if is_kind(t)}
        if is_kind is str.isdigit and allowed:
            allowed = _allowed_counts(accepted)
        if allowed and any(is_kind(t) and t not in allowed for t in p):
            return False
    return True

def qa_scores(predictions, answers_list):
    """
    answers_list holds one string or a list of accepted strings per sample. Normalising =
    tokenize_caption, dropping a/an/the, number words as digits, plurals as singulars, grey as
    gray. Per sample:
      accuracy   (strict, the one to report) an accepted answer occurs in the prediction as a
                 whole-word phrase, not negated (not/no/never/without/... in the 3 tokens
                 before it), no other colour, shape or count than the answers name (for the
                 kinds they name), and no token repeated 3+ times in a row
      exact      the normalised prediction equals a normalised answer
      contains   lenient: an answer occurs as a whole-word phrase ("cat" is not in
                 "scattered"); "red and blue and green" passes it, so never report it alone
    Returns {'exact', 'contains_lenient', 'accuracy', 'n', 'exact_per_sample',
    'contains_per_sample', 'accuracy_per_sample'}.
    """
    answers = _check_pairs(predictions, answers_list)
    exact, contains, correct = [], [], []
    for pred, accepted in zip(predictions, answers):
        p = ' '.join(_normalize(pred))
        norm = [' '.join(a) for a in map(_normalize, accepted) if a]  # "the" alone checks nothing
        exact.append(any(p == a for a in norm))
        contains.append(any(f' {a} ' in f' {p} ' for a in norm))
        correct.append(_qa_correct(pred, accepted))
    n, mean = len(exact), lambda xs: sum(xs) / len(xs) if xs else None  # no question: not measured
    return {'exact': mean(exact), 'contains_lenient': mean(contains), 'accuracy': mean(correct), 'n': n,
            'exact_per_sample': exact, 'contains_per_sample': contains, 'accuracy_per_sample': correct}

def question_kind(question):
    """'color', 'count', 'what' or 'other', from the question text"""
    q = ' '.join(tokenize_caption(question))
    if 'color' in q or 'colour' in q:
        return 'color'
    if q.startswith('how many'):
        return 'count'
    return 'what' if q.startswith('what') else 'other'

# -----------------------------------------------------------------------------
# caption length distribution

LENGTH_BINS = (0, 5, 10, 15, 20, 30, 40, 60)  # lower edges in words; the last bin is open

def _percentile(xs, q):
    # xs sorted; numpy.percentile's default: linear between the closest ranks, computed the way
    # numpy does (from the upper neighbour past the midpoint) so the numbers match to the bit
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    a, b, t = xs[lo], xs[min(lo + 1, len(xs) - 1)], pos - lo
    return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)

def _length_summary(lengths):
    xs, n = sorted(lengths), len(lengths)
    hist = [0] * len(LENGTH_BINS)
    for x in xs:
        hist[bisect_right(LENGTH_BINS, x) - 1] += 1
    if n == 0:
        return {'n': 0, 'mean': 0.0, 'median': 0.0, 'p10': 0.0, 'p90': 0.0, 'hist': hist}
    return {'n': n, 'mean': sum(xs) / n, 'median': (xs[(n - 1) // 2] + xs[n // 2]) / 2,
            'p10': _percentile(xs, 10), 'p90': _percentile(xs, 90), 'hist': hist}

def length_stats(candidates, references_list):
    """Word lengths (tokenize_caption) of the generations vs every reference caption."""
    refs = _check_pairs(candidates, references_list)
    bins = [f'{lo}-{hi - 1}' for lo, hi in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:])] + [f'{LENGTH_BINS[-1]}+']
    return {
        'bins': bins,
        'generated': _length_summary([len(tokenize_caption(c)) for c in candidates]),
        'references': _length_summary([len(tokenize_caption(r)) for rs in refs for r in rs]),
    }

# -----------------------------------------------------------------------------
# glue: score report rows

def score_rows(rows):
    """
    Rows are dicts with "generation" and either "references" (captioning) or "answers" (QA).
    Attaches per-sample scores to each row in place (bleu4, cider_d, hallucinated / exact,
    contains, correct) and returns the set's summary metrics: n_captions, bleu4, cider_d,
    chair_i, chair_s, length / n_qa, qa_accuracy, qa_exact, qa_contains_lenient, and
    qa_by_kind (accuracy per question kind) when the QA rows carry a "question". Score each
    set (val, golden, QA) separately: CIDEr-D's IDF depends on the corpus it is computed over.
    """
    metrics = {}
    cap = [r for r in rows if r.get('references')]
    if cap:
        cands, refs = [r['generation'] for r in cap], [r['references'] for r in cap]
        b, b_per = bleu4(cands, refs)
        c, c_per = cider_d(cands, refs)
        h, h_per = hallucination_rate(cands, refs)
        for r, bs, cs, hs in zip(cap, b_per, c_per, h_per):
            r['bleu4'], r['cider_d'], r['hallucinated'] = bs, cs, hs
        metrics.update(n_captions=len(cap), bleu4=b, cider_d=c, chair_i=h['chair_i'], chair_s=h['chair_s'],
                       length=length_stats(cands, refs))
    qa = [r for r in rows if r.get('answers')]
    if qa:
        q = qa_scores([r['generation'] for r in qa], [r['answers'] for r in qa])
        for r, e, k, a in zip(qa, q['exact_per_sample'], q['contains_per_sample'], q['accuracy_per_sample']):
            r['exact'], r['contains'], r['correct'] = e, k, a
        metrics.update(n_qa=q['n'], qa_accuracy=q['accuracy'], qa_exact=q['exact'],
                       qa_contains_lenient=q['contains_lenient'])
        kinds = {}
        for r in qa:
            if r.get('question'):
                kinds.setdefault(question_kind(r['question']), []).append(r['correct'])
        if kinds:
            metrics['qa_by_kind'] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    return metrics


def fmt(x, digits=3):
    """A metric for a line of text: a metric of an empty set (None) is 'not measured'."""
    return 'not measured' if x is None else f'{x:.{digits}f}'
