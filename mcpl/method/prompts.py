"""Concept sentences: parsing, the three MCPL strategies, and prompt templates.

Syntax (docs/FORMAT.md): `a photo of a brown <dog|dog|brown> on a rolling <skateboard|board>`.
Everything here is pure text; the tokenizer is only consulted through `check_against_vocab`.
Text hygiene for anything a user writes into a table lives here too (`text_problem`,
`visible`): a sentence, a path or a name with a control character, a bidi override or a
zero-width character is refused, and no user text ever reaches a terminal unescaped.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mcpl.errors import SentenceError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# A word: letters and digits of any script, ' and -; anything else is a one-character word.
# (For ASCII this is exactly [A-Za-z0-9'-]+; "café" stays one word instead of "caf" + "é".)
WORD_RE = re.compile(r"(?:[^\W_]|['-])+|[^\s]")
MAX_SENTENCE_CHARS = 1000  # any real caption is far shorter; the token limit (77 for SD) bites first
MAX_NAME_CHARS = 64  # a placeholder name is a folder name and part of a registry name
# Unicode categories refused in user text: controls (NUL, BEL, ESC of ANSI sequences, line
# breaks, tabs), format characters (bidi overrides like U+202E, zero-width spaces and joiners,
# soft hyphens, BOM), surrogates, private use, unassigned, line/paragraph separators.
_BAD_CATEGORIES = {"Cc": "control character", "Cf": "invisible formatting character",
                   "Cs": "lone surrogate", "Co": "private-use character", "Cn": "unassigned code point",
                   "Zl": "line separator", "Zp": "paragraph separator"}
ARTICLES = {"a", "an", "the"}
PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a rendering of ")
TEMPLATES = (
    "{}",
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
    "a clean photo of {}",
    "a nice picture of {}",
    "an image of {}",
)


@dataclass(frozen=True)
class Concept:
    """One marked object: its placeholder token, initializer word and optional adjective."""

    name: str
    initializer: str
    adjective: str | None = None

    @property
    def token(self) -> str:
        return f"<{self.name}>"


@dataclass(frozen=True)
class Sentence:
    """A parsed sentence: a sequence of plain words and concepts, in order."""

    source: str
    pieces: tuple[str | Concept, ...]

    @property
    def concepts(self) -> list[Concept]:
        return [p for p in self.pieces if isinstance(p, Concept)]

    @property
    def words(self) -> list[str]:
        return [p for p in self.pieces if isinstance(p, str)]

    def as_prompt(self) -> str:
        """The sentence as a prompt, each marker replaced by its placeholder token."""
        text = " ".join(p.token if isinstance(p, Concept) else p for p in self.pieces)
        return re.sub(r" ([.,!?;:])", r"\1", text)


# --------------------------------------------------------------------------------------
# Text hygiene: what user text may contain, and how it is shown.


def text_problem(text: str) -> str | None:
    """Why `text` cannot be used as a sentence, name or path (None if it can).

    Names the first offending character with its code point and Unicode name, so a user
    can find an invisible one (`U+202E RIGHT-TO-LEFT OVERRIDE at character 7`).
    """
    for i, ch in enumerate(text):
        kind = _BAD_CATEGORIES.get(unicodedata.category(ch))
        if kind:
            name = unicodedata.name(ch, "") or {"\t": "TAB", "\n": "LINE FEED", "\r": "CARRIAGE RETURN",
                                                "\x00": "NUL", "\x1b": "ESCAPE", "\x07": "BELL"}.get(ch, "")
            return f"{kind} U+{ord(ch):04X}{' ' + name if name else ''} at character {i}"
    return None


def visible(text: object, limit: int | None = None) -> str:
    """`text` safe for a terminal: every non-printable character escaped (`\\x1b`, `\\u202e`), optionally cut.

    Used wherever user-provided text is printed (validation reports, `mcpl registry show`):
    an ANSI escape or a bidi override in a sentence must never act on the terminal.
    """
    text = str(text)
    cut = ""
    if limit is not None and len(text) > limit:
        text, cut = text[:limit], f"... ({len(text) - limit:,} more characters)"
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text) + cut


def shown(text: str, limit: int = 80) -> str:
    """A user's text quoted for an error message: repr (escapes controls), cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def parse_sentence(text: str) -> Sentence:
    """Parse the concept syntax; raise SentenceError naming what is wrong.

    Refused before parsing: more than MAX_SENTENCE_CHARS characters, and any control,
    invisible-formatting or unassigned character (text_problem). Words are read from the
    NFC form of the text, so a decomposed "é" is the same word as a composed one.
    """
    if not isinstance(text, str) or not text.strip():
        raise SentenceError("empty sentence")
    if len(text) > MAX_SENTENCE_CHARS:
        raise SentenceError(f"the sentence is {len(text):,} characters long; the limit is {MAX_SENTENCE_CHARS:,}")
    problem = text_problem(text)
    if problem:
        raise SentenceError(f"the sentence contains a {problem}: {shown(text)}; remove it")
    source, text = text, unicodedata.normalize("NFC", text)
    pieces: list[str | Concept] = []
    pos = 0
    for match in re.finditer(r"[<>]", text):
        if match.start() < pos:
            continue
        if match.group() == ">":
            raise SentenceError(f"unbalanced '>' at character {match.start()} in {shown(text)}")
        end = text.find(">", match.start())
        nested = text.find("<", match.start() + 1)
        if end < 0 or (0 <= nested < end):
            raise SentenceError(f"unbalanced '<' at character {match.start()} in {shown(text)}")
        pieces.extend(WORD_RE.findall(text[pos : match.start()]))
        pieces.append(_parse_marker(text[match.start() + 1 : end], text))
        pos = end + 1
    pieces.extend(WORD_RE.findall(text[pos:]))
    sentence = Sentence(source=source, pieces=tuple(pieces))
    _validate(sentence)
    return sentence


def _parse_marker(body: str, text: str) -> Concept:
    fields = [f.strip() for f in body.split("|")]
    if len(fields) > 3:
        raise SentenceError(f"marker {shown('<' + body + '>')} has {len(fields)} fields; "
                            "expected <name|init|adjective>")
    name = fields[0]
    if not name or not NAME_RE.match(name):
        raise SentenceError(f"invalid placeholder name {shown(name)} in {shown(text)} (letters, digits, _ and -)")
    if len(name) > MAX_NAME_CHARS:
        raise SentenceError(f"placeholder name {shown(name, 40)} is {len(name)} characters; at most {MAX_NAME_CHARS} "
                            "(it names the concept's folder and registry entry)")
    initializer = fields[1] if len(fields) > 1 else name
    if not initializer or not re.match(r"^[\w'-]+$", initializer):
        raise SentenceError(f"invalid initializer word {shown(initializer)} for <{name}> (one word)")
    adjective = fields[2] if len(fields) > 2 and fields[2] else None
    return Concept(name=name, initializer=initializer.lower(), adjective=adjective.lower() if adjective else None)


def _validate(sentence: Sentence) -> None:
    concepts = sentence.concepts
    if not concepts:
        raise SentenceError(f"no placeholder in {shown(sentence.source)}; mark concepts like <dog|dog>")
    names = [c.name for c in concepts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SentenceError(f"duplicate placeholder(s) {', '.join('<' + d + '>' for d in dupes)}")
    _same_but_case(names)
    words = {w.lower() for w in sentence.words}
    for c in concepts:
        if c.adjective and c.adjective not in words:
            raise SentenceError(f"adjective {shown(c.adjective)} of <{c.name}> is not a word of the sentence")


def _same_but_case(names: Sequence[str]) -> None:
    """CLIP's tokenizer lowercases the text: <Dog> and <dog> would be one token, learned as two."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise SentenceError(f"placeholders <{other}> and <{name}> differ only in case; the tokenizer reads "
                                "them as one word: rename one")


def check_against_vocab(sentences: Sequence[Sentence], vocab: set[str] | dict[str, int]) -> None:
    """Reject placeholders that already are vocabulary entries (they would not be new words)."""
    for s in sentences:
        for c in s.concepts:
            if any(t in vocab for t in (c.token, c.token + "</w>", c.token.lower(), c.token.lower() + "</w>")):
                raise SentenceError(f"placeholder {c.token} is already in the tokenizer's vocabulary")


# --------------------------------------------------------------------------------------
# Strategies: which tokens learn, and how each image's prompt is written with them.


@dataclass(frozen=True)
class LearnableToken:
    """A new token: its text, the word that initialises it, and the concept label it carries."""

    token: str
    initializer: str
    label: str
    adjective: str | None = None


@dataclass
class PromptPlan:
    """Learnable tokens of a job and, per image, the core prompt and usable templates."""

    tokens: list[LearnableToken]
    cores: list[list[str]]  # per image: words, where learnable ones are token strings
    templates: list[str] = field(default_factory=lambda: ["{}"])
    num_vectors: int = 1
    # per image: orders of the sentence's phrases (identity first) that PromptCL views may use
    orders: list[list[tuple[int, ...]]] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.tokens]

    def token_strings(self, token: LearnableToken) -> list[str]:
        """diffusers' multi-vector convention: tok, tok_1, tok_2, ..."""
        return [token.token] + [f"{token.token}_{i}" for i in range(1, self.num_vectors)]

    def all_token_strings(self) -> list[str]:
        return [s for t in self.tokens for s in self.token_strings(t)]

    def prompt(self, image_index: int, template: str, order: int = 0) -> str:
        """The image's prompt in `template`; `order` > 0 lists its phrases in another order
        (`self.orders[image_index][order]`), the way a PromptCL view may."""
        by_token = {t.token: t for t in self.tokens}
        core = self.cores[image_index]
        if order:
            core = reorder(core, self.orders[image_index][order])
        words = [" ".join(self.token_strings(by_token[w])) if w in by_token else w for w in core]
        return template.format(" ".join(words))

    def n_orders(self, image_index: int) -> int:
        return len(self.orders[image_index]) if self.orders else 1

    @property
    def reorderable(self) -> bool:
        """Whether any image's sentence has a phrase order other than the written one."""
        return any(len(o) > 1 for o in self.orders)

    def adjectives(self, image_index: int) -> dict[str, str]:
        """label -> the prompt entry holding the concept's adjective, for this image's concepts.

        Usually the frozen adjective word; under MCPL-all the learnable token that replaced it.
        """
        core = self.cores[image_index]
        replaced = {t.token: t.initializer for t in self.tokens if t.label.startswith("w")}
        out = {}
        for t in self.tokens:
            if not t.adjective or t.token not in core:
                continue
            for entry in core:
                if entry.lower() == t.adjective or replaced.get(entry) == t.adjective:
                    out[t.label] = entry
                    break
        return out


def plan_prompts(sentences: Sequence[Sentence], strategy: str, num_vectors: int = 1,
                 use_templates: bool = True, templates: Sequence[str] = TEMPLATES) -> PromptPlan:
    """Derive the learnable tokens and prompts of one job from its sentences.

    `templates` are the candidates (a model may know only some phrasings); those that would
    collide with a learnable word or an adjective, or double a word, are dropped.
    """
    if strategy == "diverse" and len(sentences) < 2:
        raise SentenceError("MCPL-diverse needs at least two images with sentences")
    if strategy in ("one", "all") and len(sentences) != 1:
        raise SentenceError(f"MCPL-{strategy} takes exactly one image; use 'diverse' for a group")
    tokens: dict[str, LearnableToken] = {}
    cores: list[list[str]] = []
    learnable_words: set[str] = set()
    for sentence in sentences:
        core: list[str] = []
        pieces = sentence.pieces if strategy == "all" else _strip_prefix(sentence.pieces)
        for i, piece in enumerate(pieces):
            if isinstance(piece, Concept):
                tok = LearnableToken(piece.token, piece.initializer, piece.name, piece.adjective)
                known = tokens.setdefault(tok.token, tok)
                if known.initializer != tok.initializer or known.adjective != tok.adjective:
                    raise SentenceError(
                        f"{tok.token} is used with different initializers/adjectives across the group")
                core.append(tok.token)
            elif strategy == "all" and re.match(r"^[A-Za-z0-9'-]+$", piece):
                word = piece.lower()
                tok = LearnableToken(f"<w{i}.{word}>", word, f"w{i}.{word}")
                tokens[tok.token] = tok
                learnable_words.add(word)
                core.append(tok.token)
            else:
                core.append(piece)
        cores.append(core)
    _same_but_case([t.label for t in tokens.values() if "." not in t.label])  # concepts (MCPL-all words have a dot)
    adjectives = {t.adjective for t in tokens.values() if t.adjective}
    usable = valid_templates(cores, learnable_words | adjectives, templates) if use_templates else ["{}"]
    usable = usable or ["{}"]
    starts = {t.token: t.initializer for t in tokens.values()}
    orders = [[o for o in phrase_orders(core, starts) if o == tuple(sorted(o))
               or valid_templates([reorder(core, o)], set(), usable) == usable] for core in cores]
    return PromptPlan(tokens=list(tokens.values()), cores=cores, templates=usable, num_vectors=num_vectors,
                      orders=orders)


# Words that join a sentence's phrases; phrases joined by them may be listed in any order
# ("a red <a> and a blue <b>" = "a blue <b> and a red <a>"), which gives PromptCL views that
# differ from the training prompt even when a model knows no template but "{}".
PHRASE_SEPARATORS = {"and", ","}
MAX_ORDERS = 24
_LEARNED_WORD = re.compile(r"^<w\d+\.(.+)>$")  # MCPL-all's own words still read as the words they started from


def _plain(word: str) -> str:
    learned = _LEARNED_WORD.match(word)
    return (learned.group(1) if learned else word).lower()


def _head(core: Sequence[str]) -> int:
    """Length of a leading 'a photo of' that stays in front whatever the phrase order (MCPL-all keeps it)."""
    return _prefix_length([_plain(w) for w in core])


def split_phrases(core: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """A core's phrases and the separators between them ('and', ','), after any leading 'a photo of'."""
    phrases: list[list[str]] = [[]]
    separators: list[str] = []
    for word in core[_head(core):]:
        if _plain(word) in PHRASE_SEPARATORS:
            separators.append(word)
            phrases.append([])
        else:
            phrases[-1].append(word)
    return phrases, separators


def phrase_orders(core: Sequence[str], starts: Mapping[str, str] | None = None) -> list[tuple[int, ...]]:
    """Orders of the core's phrases, identity first: every permutation up to 4 phrases, else the
    rotations and their reversals (at most MAX_ORDERS). One order when there is nothing to reorder,
    and when two phrases read the same once each learned word is its initializer (`starts`: token ->
    initializer): in `a <a|object> and a <b|object>` the place in the sentence is all that tells the
    words apart, and a reordered prompt would teach both words both objects (measured on the toy
    model: full MCPL 38 % -> 0 % recovery, benchmarks/results/toyworld_sweep_shuffle_bare_shuffled.md)."""
    phrases, _ = split_phrases(core)
    n = len(phrases)
    identity = tuple(range(n))
    if n < 2 or any(not p for p in phrases):
        return [identity]
    read = [tuple(_plain((starts or {}).get(w, w)) for w in p) for p in phrases]
    if len(set(read)) < n:
        return [identity]
    if n <= 4:
        return list(itertools.permutations(range(n)))
    rotations = [tuple((i + k) % n for i in range(n)) for k in range(n)]
    return (rotations + [tuple(reversed(r)) for r in rotations])[:MAX_ORDERS]


def reorder(core: Sequence[str], order: Sequence[int]) -> list[str]:
    """The core with its phrases in `order`; separators stay where they are."""
    phrases, separators = split_phrases(core)
    out: list[str] = list(core[:_head(core)])
    for i, k in enumerate(order):
        if i:
            out.append(separators[i - 1])
        out.extend(phrases[k])
    return out


def _prefix_length(words: Sequence[str | None]) -> int:
    """How many leading words are one of PREFIXES ('a photo of'), when more words follow; else 0."""
    for prefix in PREFIXES:
        n = len(prefix.split())
        if list(words[:n]) == prefix.split() and len(words) > n:
            return n
    return 0


def _strip_prefix(pieces: Sequence[str | Concept]) -> list[str | Concept]:
    """Drop a leading 'a photo of' so templates do not stack prefixes ('a photo of a photo of')."""
    return list(pieces[_prefix_length([p.lower() if isinstance(p, str) else None for p in pieces]):])


def valid_templates(cores: Sequence[Sequence[str]], forbidden_words: set[str],
                    candidates: Sequence[str] = TEMPLATES) -> list[str]:
    """Templates whose words avoid learnable words/adjectives and never double a word."""
    out = []
    for template in candidates:
        words = set(template.replace("{}", " ").split())
        if words & forbidden_words:
            continue
        if any(_has_repeat(template.format(" ".join(core)).split()) for core in cores):
            continue
        out.append(template)
    return out


def _has_repeat(words: Sequence[str]) -> bool:
    return any(a.lower() == b.lower() for a, b in zip(words, words[1:], strict=False))
