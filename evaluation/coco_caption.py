"""
Caption scores as the COCO caption evaluation toolkit (pycocoevalcap) computes them, the
numbers captioning papers report: PTB tokenization with the toolkit's punctuation removal,
then Bleu_1..4, METEOR, ROUGE_L, CIDEr (CIDEr-D) and SPICE.

  ptb_tokenize     a pure-Python PTB-style tokenizer: what the toolkit's Stanford
                   PTBTokenizer (-preserveLines -lowerCase) plus its punctuation removal
                   make of a caption (tests/test_benchmarks.py compares them)
  tokenize_all     the toolkit's own tokenizer when pycocoevalcap and Java are installed,
                   ptb_tokenize otherwise
  score            every metric on {image id: [references]} and {image id: caption};
                   BLEU, ROUGE-L and CIDEr-D from metrics.py (equal to the toolkit's), METEOR
                   and SPICE from the toolkit's jars when they can run, "not computed" with the
                   reason otherwise (SPICE downloads Stanford CoreNLP models on first use,
                   which an offline machine cannot do: never an error)

pycocoevalcap is optional (not in requirements.txt): `pip install pycocoevalcap` and a Java
runtime make every number directly comparable to published ones.
"""
import os
import re
import shutil
import sys
import unicodedata

from evaluation import metrics

# -----------------------------------------------------------------------------
# The PTB tokenizer, in Python
#
# Written from the behaviour of Stanford's PTBTokenizer as the toolkit runs it, then the
# toolkit's punctuation removal. What matters after that removal: quotes, periods, commas,
# colons, semicolons, dashes and lone ? / ! vanish, so it only matters what stays attached to
# a word. Contractions split ("don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can
# not"); hyphenated words, numbers (3.5, 1,000, 10:30, 1/2) and slashed words stay whole;
# "$", "%", "&", "#" become tokens; brackets become "-lrb-" and friends, which the removal
# misses (it lists them upper-case, the tokenizer lower-cases them first), so they stay in
# the scored text; known abbreviations keep their period ("mr.", "st.", "u.s.", "etc.", a
# single letter), and so does any word before a comma ("dog.,"). Characters outside the
# Basic Multilingual Plane (emoji) and control characters are dropped, as the Java tokenizer
# drops them.

# the toolkit's list: the tokens it drops after tokenizing
PUNCTUATIONS = {"''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-', '--', '...',
                ';'}
# abbreviations that keep their period, as the Java tokenizer treats them (measured on it): in
# any case; capitalised only (they are also common words: "la.", "miss."); not all upper case;
# before a number only ("no. 5", "fig. 2")
_ABBREV_ANY = set("""adj adm adv al ala alex apr ariz assn assoc atty attys aug ave bancorp bhd bldg blvd brig bros
calif capt cf cie cmdr co col colo comdr conn corp cos cpl ct dak dec dept det dr drs elec ens est etc ext feb fla
fri ft ga gen gov govs hon inc ind insp intl invt jan jos jr jul jun kan kans ky lieut lt ltd maj mar md messrs mich
minn mlle mme mo mon mont mr mrs ms mt natl neb nev nov oct okla penn pfc ph plc pres prof profs pvt rd rep reps rev
rt sen sens sep sept seq sgt spc sq sr st ste supt supts sys tel tenn thu thurs tue tues univ va vs vt wed wis wisc
wm wyo""".split())
_ABBREV_CAPITAL = set('ark az del ill la mass miss ore pa tex wash'.split())
_ABBREV_NOT_UPPER = set('mfg mtg pte pty'.split())
_ABBREV_NUMBER = set('art ca fig no nos op pp prop'.split())
# a single letter's period ends the sentence when one of these, capitalised, comes next
_SENTENCE_START = set('''a about after an as at but earlier he her here however if in it last many more now once one
other our she since so some such that the their then there these they this we what when while yet you'''.split())
# words the Java tokenizer splits in two
_SPLIT_WORDS = {'cannot': ('can', 'not'), 'gonna': ('gon', 'na'), 'gotta': ('got', 'ta'), 'wanna': ('wan', 'na'),
                'lemme': ('lem', 'me'), 'gimme': ('gim', 'me')}
_CONTRACTION = re.compile(r"(?i)(.+?)(n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m|n))$")
# words with an inner apostrophe it keeps whole ("o'clock", "o'neil", "ne'er", "ma'am")
_APOS_WORD = re.compile(r"(?i)[cdlos]['\u2019][^\W\d_]{2,}|[^\W\d_]*[aeiou]['\u2019][aeiou][^\W\d_]*")
_REPLACE = {'\u00a2': ' cents ', '\u00a3': '#', '\u20ac': '$', '\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4',
            '\u2153': '1/3', '\u2154': '2/3'}
_ENTITIES = (('&amp;', '&'), ('&lt;', '<'), ('&gt;', '>'), ('&quot;', ' '), ('&nbsp;', ' '))
_BRACKETS = {'(': '-lrb-', ')': '-rrb-', '[': '-lsb-', ']': '-rsb-', '{': '-lcb-', '}': '-rcb-'}
# characters that are only ever dropped: quotes (any direction), sentence punctuation, dashes
_DROPPED = set('"\'`\u201c\u201d\u2018\u2019\u00ab\u00bb\u2039\u203a\u201b'  # quotes
               ',;:.\u2026\x85'  # sentence punctuation, ellipses
               '-\u2010\u2011\u2012\u2013\u2014\u2015')  # hyphens and dashes

# a word character: letters, digits, underscore, and combining marks (Devanagari vowel
# signs, a decomposed accent), which Python's \w leaves out
_MARKS = ''.join(chr(c) for c in range(0x300, 0x10000) if unicodedata.category(chr(c)).startswith('M'))
_W = r'(?:[^\W_]|[' + re.escape(_MARKS) + '])'  # an underscore joins words ("a_b") but starts or ends none
_L = r'[^\W\d_]'
_NUM = r'\d+(?:[.,:/]\d+)*'
_WORD = rf'{_W}+(?:_+{_W}+)*'
_PART = rf'{_WORD}(?:/{_WORD})*'
# Every rule is tried at each position and the longest match wins (ties: the first rule), as
# in the lexer the Java tokenizer is generated from.
_RULES = [(kind, re.compile(rx)) for kind, rx in (
    ('url', r'(?:https?|ftp)://[^\s"<>()\[\]{}]*[^\s"<>()\[\]{}.,;:!?\'`]'),
    ('keep', rf'{_W}+@{_W}+(?:\.{_W}+)*'),                  # e-mail
    ('keep', r'&#\d+;'),                                    # a numeric entity stays as written
    ('keep', rf'[#@]{_L}+'),                                # #tag, @name
    ('keep', r'[A-Z]{1,3}\$'),                              # US$, A$
    ('keep', r'[A-Z]+&[A-Z]+'),                             # AT&T, Q&A (upper case only)
    ('keep', r'</?[A-Za-z][\w-]*>'),                        # an SGML tag
    ('keep', r'[A-Za-z](?:\.[A-Za-z])+\.?'),                # u.s.a., p.m., e.g.
    ('abbrev', rf'{_W}+\.'),                                # mr., st., a. (checked against the lists)
    ('keep', rf'[-+]?(?:{_NUM}|[.,:]\d+(?:[.,:/]\d+)*)'),  # 3.5  1,000  10:30  -5  .5
    ('keep', r'\d+\x00\d+/\d+'),                           # 3 1/2 (joined before the scan)
    ('keep', rf'{_PART}(?:[-\u2010\u2011]{_PART})*'),       # words, t-shirt, and/or, 5th
    ('keep', rf'{_NUM}(?:[-\u2010\u2011]{_PART})+'),        # 3.5-inch, 1/2-inch
    ('keep', rf'{_L}{_W}*(?:[.?!]{_L}{_W}*)+'),             # dog.cat, file.jpg
    ('apos', rf'{_WORD}(?:[\'\u2019]{_WORD})+'),              # don't, dog's, o'clock
    ('lead', r"(?i)['\u2019](?:em|cause|till?|n['\u2019]?|t(?:is|was)|\d\d(?:s)?|s|re|ve|ll|d|m)(?!\w)"),
    ('smiley', r'[:;=]-?[()]|:-?D'),                        # :) is a token, its bracket escaped
    ('keep', r'[?!]{2,}|\*+'),                              # "?!", "!!" and "**" are tokens
)]


def _apostrophes(w):
    """Tokens of a word with inner apostrophes: contractions split off the end ("shouldn't've"
    -> should n't 've), a few forms kept whole, any other apostrophe a (dropped) quote."""
    low = w.lower()
    if low in ("n't", "n\u2019t"):
        return ["n't"]
    m = re.match(r"(?i)(.+?)(['\u2019]n['\u2019])(.+)$", w)  # rock'n'roll
    if m:
        return _apostrophes(m[1]) + ["'n'"] + _apostrophes(m[3])
    m = re.match(r"(?i)([yj]['\u2019])(\w.*)$", w)  # y'all -> y' all
    if m:
        return [m[1].replace('\u2019', "'")] + _apostrophes(m[2])
    tail = []
    while True:
        m = _CONTRACTION.match(w)
        if not m:
            break
        w, tail = m[1], [m[2].replace('\u2019', "'")] + tail
    if "'" not in w and '\u2019' not in w:
        return _word(w) + tail
    if _APOS_WORD.fullmatch(w):
        return [w] + tail
    head, _, last = max(w.rpartition("'"), w.rpartition('\u2019'), key=lambda p: len(p[0]))
    return _apostrophes(head) + _word(last) + tail


def _word(w):
    return list(_SPLIT_WORDS.get(w.lower(), (w,))) if w else []


def _lead(tok):
    low = tok.lower().replace('\u2019', "'")
    if low in ("'tis", "'twas"):
        return ["'t", low[2:]]
    return [low if low[1:] in ('s', 're', 've', 'll', 'd', 'm') else tok]  # contractions in ASCII


def _chunk(chunk, follow=''):
    """Tokens of one whitespace-free piece of text. follow: what the next piece starts with
    when this one ends with a period: 'number' ("no. 5"), 'sentence' ("b. The"), or ''."""
    out, i, n = [], 0, len(chunk)
    while i < n:
        best, kind = 0, None
        for k, rx in _RULES:
            m = rx.match(chunk, i)
            if m and m.end() - i > best:
                if k == 'abbrev' and not _is_abbrev(m[0][:-1], chunk[m.end():m.end() + 1], follow):
                    continue
                best, kind = m.end() - i, k
        if kind is None:
            c = chunk[i]
            if c in _BRACKETS:
                out.append(_BRACKETS[c])
            elif c not in _DROPPED and c != '?' and c != '!':
                out.append(c)  # "$", "%", "&", "/", a symbol
            i += 1
            continue
        tok = chunk[i:i + best]
        if kind == 'apos':
            out += _apostrophes(tok)
        elif kind == 'smiley':
            out.append(tok[:-1] + _BRACKETS.get(tok[-1], tok[-1]))
        elif kind == 'lead':
            out += _lead(tok)
        elif kind == 'keep' and '\x00' in tok:
            out.append(tok.replace('\x00', '\u00a0'))  # one token with a no-break space inside
        else:
            out += _word(tok) if kind == 'keep' else [tok]
        i += best
    return out


def _is_abbrev(w, after, follow):
    """Does w keep its period? after: the character after the period in the same piece."""
    if after in (',', ';', ':'):
        return True  # any word: "dog.," is "dog." and ","
    if after == '':
        after = follow
    low = w.lower()
    if len(low) == 1 and 'a' <= low <= 'z':
        return after != 'sentence'
    if low in _ABBREV_ANY:
        return True
    if low in _ABBREV_CAPITAL:
        return w[0].isupper()
    if low in _ABBREV_NOT_UPPER:
        return not w.isupper()
    # "no." keeps its period before a number
    return low in _ABBREV_NUMBER and (after == 'number' or after.isdigit())


def _follow(piece):
    """What a piece that follows a period starts with, as _chunk's follow."""
    if piece[:1].isdigit():
        return 'number'
    m = re.match(r'[A-Za-z]+', piece)
    w = m[0] if m and piece[m.end():m.end() + 1] in ('', ',', ';', ':', '!', '?') else ''  # not "He's" or "A."
    if w and (w.isupper() or w.istitle()) and w.lower() in _SENTENCE_START:
        return 'sentence'
    return ''


_cache = {}


def ptb_tokenize(caption, next_caption=''):
    """One caption as the toolkit scores it: PTB tokens, lower case, punctuation removed,
    joined by single spaces. next_caption: the caption after it in the toolkit's input file,
    whose first word decides a few sentence-final periods, as it does for the Java tokenizer
    (which reads all captions as one text): "no." before a number keeps its period."""
    pieces = _pieces(caption)
    after = _pieces(next_caption[:40])[:1] if next_caption else []
    toks = []
    for k, p in enumerate(pieces):
        nxt = (pieces[k + 1:k + 2] or after or [''])[0]
        follow = _follow(nxt) if p.endswith('.') else ''
        got = _cache.get((p, follow))
        if got is None:
            got = [t for t in (t.lower() for t in _chunk(p, follow)) if t not in PUNCTUATIONS]
            if len(_cache) < 200_000:  # captions repeat their words: most pieces are seen before
                _cache[(p, follow)] = got
        toks += got
    return ' '.join(toks)


def _pieces(s):
    """The text split on white space, after the character-level rules: entities, currency
    signs and fractions rewritten, emoji and control characters made spaces."""
    if '&' in s:
        for a, b in _ENTITIES:
            s = s.replace(a, b)
    if not s.isascii() or not s.isprintable():
        s = ''.join(_REPLACE.get(c, c) if ord(c) < 0x10000 and unicodedata.category(c)[0] != 'C' else ' '
                    for c in s)
    if '/' in s:
        s = re.sub(r'(?<![\w.,:/-])(\d+) (\d+/\d+)(?![\w/])', '\\1\x00\\2', s)  # "3 1/2" is one token
    return s.split()

# -----------------------------------------------------------------------------
# The official toolkit, when it is installed

OFFICIAL_TOKENIZER = "pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1)"
FALLBACK_TOKENIZER = 'coco_caption.ptb_tokenize (pure Python)'
# characters the Java tokenizer (-preserveLines) takes as a line end: inside a caption one
# would shift every later caption onto the wrong image (the toolkit's wrapper only replaces \n)
_LINE_BREAKS = re.compile('[\r\n\x0b\x0c\u2028\u2029]')


def toolkit_missing():
    """None when pycocoevalcap and a Java runtime are both installed, else what is missing."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return 'pycocoevalcap is not installed (pip install pycocoevalcap)'
    if shutil.which('java') is None:
        return 'no Java runtime (java) on the PATH'
    return None


def tokenize_all(captions, official=True):
    """captions: {key: [caption, ...]}. Returns ({key: [tokenized caption, ...]}, which
    tokenizer ran, why the official one did not or None). The official tokenizer reads all
    captions as one text, in this order; the fallback is given the same order."""
    clean = {k: [_LINE_BREAKS.sub(' ', c) for c in v] for k, v in captions.items()}
    why = toolkit_missing() if official else 'not asked for'
    if why is None:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
            with _quiet_stderr():  # the Java tokenizer warns about every character it drops
                out = PTBTokenizer().tokenize({k: [{'caption': c} for c in v] for k, v in clean.items()})
            if all(len(out.get(k, ())) == len(v) for k, v in clean.items()):
                return {k: out[k] for k in clean}, OFFICIAL_TOKENIZER, None
            why = 'the official tokenizer returned the wrong number of captions'
        except Exception as e:  # a read-only install, a broken Java: the fallback scores the same text
            why = f'the official tokenizer failed ({type(e).__name__}: {str(e).strip()[:120]})'
    flat = [c for v in clean.values() for c in v]
    toks = iter([ptb_tokenize(c, flat[i + 1] if i + 1 < len(flat) else '') for i, c in enumerate(flat)])
    return {k: [next(toks) for _ in v] for k, v in clean.items()}, FALLBACK_TOKENIZER, why


class _quiet_stderr:
    """Sends file descriptor 2 (where a child process writes) to /dev/null for a while."""
    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


class _Meteor:
    """The toolkit's METEOR 1.5 (one Java process, reused for every subset scored)."""
    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor
        self.scorer = Meteor()

    def __call__(self, gts, res):
        return self.scorer.compute_score(gts, res)[0]

    def close(self):
        proc = getattr(self.scorer, 'meteor_p', None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _spice_missing():
    """None when SPICE can run without a download, else why not."""
    import pycocoevalcap.spice as spice
    lib = os.path.join(os.path.dirname(spice.__file__), 'lib')
    if not os.path.exists(os.path.join(lib, 'stanford-corenlp-3.6.0-models.jar')):
        return ('needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads on first use; with a network, '
                'run once: python -c "from pycocoevalcap.spice.spice import Spice; Spice()"')
    return None


def _spice(gts, res):
    from pycocoevalcap.spice.spice import Spice
    with _quiet_stderr():
        return float(Spice().compute_score(gts, res)[0])


def score(references, candidates, meteor=True, spice=True, official_tokenizer=True, subsets=None):
    """
    references: {image id: [reference captions]}, candidates: {image id: caption}, the same
    ids. Returns (metrics, per_image): metrics with the toolkit's names (Bleu_1..Bleu_4,
    METEOR, ROUGE_L, CIDEr, SPICE; one left out is in metrics['not_computed'] with the
    reason), the tokenizer used and the number of images; per_image {id: {CIDEr, ROUGE_L}}.
    subsets: {name: [ids]} also scored each as a corpus of its own (NoCaps' domains), under
    metrics[name]. Scales as the toolkit prints them: 0-1, CIDEr 0-10.
    """
    ids = list(references)
    if set(ids) != set(candidates):
        raise ValueError('references and candidates must have the same image ids')
    gts, tokenizer, why = tokenize_all({i: list(references[i]) for i in ids}, official_tokenizer)
    res, _, _ = tokenize_all({i: [candidates[i]] for i in ids}, official_tokenizer and why is None)
    missing, java = {}, {}
    for name, wanted in (('METEOR', meteor), ('SPICE', spice)):
        reason = 'not asked for' if not wanted else toolkit_missing() or (_spice_missing() if name == 'SPICE' else None)
        if reason is None:
            try:
                java[name] = _Meteor() if name == 'METEOR' else _spice
            except Exception as e:  # no usable Java after all
                reason = f'{type(e).__name__}: {str(e).strip()[:160]}'
        if reason is not None:
            missing[name] = reason
    try:
        m, per_image = _score_tokenized(ids, gts, res, java, missing)
        for name, sub in (subsets or {}).items():
            keep = set(sub)
            m[name] = _score_tokenized([i for i in ids if i in keep], gts, res, java, {})[0]
    finally:
        if 'METEOR' in java:
            java['METEOR'].close()
    m.update(tokenizer=tokenizer, **({'tokenizer_note': why} if why and why != 'not asked for' else {}))
    return m, per_image


def _score_tokenized(ids, gts, res, java, missing):
    """Every metric on the tokenized captions of ids; java: {name: scorer} of METEOR / SPICE."""
    cands, refs = [res[i][0] for i in ids], [gts[i] for i in ids]
    b = metrics.bleu_scores(cands, refs, tokenize=str.split)
    rouge, rouge_per = metrics.rouge_l(cands, refs, tokenize=lambda s: s.split(' '))  # as the toolkit splits
    cider, cider_per = metrics.cider_d(cands, refs, tokenize=str.split)
    m = {f'Bleu_{n + 1}': b[n] for n in range(4)}
    for name, run in java.items():
        try:
            m[name] = float(run({i: gts[i] for i in ids}, {i: res[i] for i in ids}))
        except Exception as e:  # a Java failure costs this metric, never the evaluation
            missing[name] = f'{type(e).__name__}: {str(e).strip()[:160]}'
    m.update(ROUGE_L=rouge, CIDEr=cider)
    m = {k: m[k] for k in ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE') if k in m}
    m['images'] = len(ids)
    if missing:
        m['not_computed'] = missing
    return m, {i: {'CIDEr': c, 'ROUGE_L': r} for i, c, r in zip(ids, cider_per, rouge_per)}
