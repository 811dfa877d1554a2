"""Finding instruction spans automatically: the sentences and clauses that constrain the answer.

Directer steers only the instruction's tokens; when a row names none, :func:`find_instruction_spans`
finds them. The prompt is cut into sentences (and lines), each sentence into phrases at commas,
conjunctions and the prepositions that usually open a constraint ("... in exactly two sentences",
"... without the letter e"), and a small linear scorer decides which phrases constrain the answer:
its length, format, wording, letters, language, tone, start or end, per-line or per-sentence rules,
templates, copying, options to draw from. A sentence's span runs from its first constraining phrase
to its last; a constraining sentence that ends in a colon takes the lines it introduces (a template,
a list to draw from) when the scorer agrees they continue it.

Why a learned scorer and not more trigger words: rules written against IFEval's phrasings found half
of the constraints people phrase otherwise (recall 0.50 on ``benchmarks/spans/heldout.jsonl``; this
scorer 0.88, at precision 0.96). Its features are the phrase's words and word pairs, their classes
(units, quantities, answer words, modals, formats), the classes of the sentence around it, its
place (first in its sentence, a list item, after a colon, inside pasted material), and the old
rules' patterns as evidence. Its weights (``data/span_scorer.json``, about 300 kB) are trained by
``benchmarks/train_span_scorer.py`` on IFEval's gold spans (two thirds) and prompts written for this
project, never on the held-out set. No model, no network, no GPU: plain Python, about 2,500 prompts
per second on one core.

A constraint woven into the task's own clause ("Write a 5-line poem") is left alone by design:
marking it would steer the whole task.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CharSpan = tuple[int, int]
SCORER = Path(__file__).parent / "data" / "span_scorer.json"
# what found a row's spans, recorded in its output (``span_detector``): bump it whenever what
# :func:`find_instruction_spans` finds changes (new weights, features or cuts)
DETECTOR = "scorer-1"

_NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty hundred thousand dozen single couple once twice thrice half"
)
_NUMBER = rf"(?:\d+|{_NUMBER_WORDS.replace(' ', '|')})"
_UNITS = (
    r"(?:words?|sentences?|paragraphs?|bullet(?:\s+points?)?|sections?|times|letters?|placeholders?|"
    r"highlighted\s+sections?|parts?|characters?|lines?|items?|points?|responses?)"
)
_RESPONSE = r"(?:response|answer|reply|output|essay|poem|story|letter|email|text|article|blog|rap|song|post|summary)"

# Evidence that a phrase constrains the response (the rule-based detector's patterns, now features).
CONSTRAINT_PATTERNS = [
    rf"\b(?:at\s+least|at\s+most|less\s+than|more\s+than|fewer\s+than|no\s+more\s+than|no\s+less\s+than|exactly|"
    rf"under|over|maximum\s+of|minimum\s+of|up\s+to|around)\s+{_NUMBER}\b",
    rf"\b{_NUMBER}\s+(?:or\s+(?:more|fewer|less)\s+)?{_UNITS}\b",
    r"\b(?:all\s+)?(?:capital(?:ized|s)?|upper\s*case|lower\s*case|caps|capitalization|capital\s+letters)\b",
    r"\bcommas?\b",
    r"\bkey\s*words?\b",
    r"\b(?:the\s+)?(?:word|phrase|letter)s?\s+[\"'“‘*]",
    r"\bletter\s+[\"'“]?[a-z][\"'”]?\s",
    r"\b(?:json|markdown|html|bullet(?:ed)?|highlight(?:ed|s)?|placeholders?|postscript|p\.\s*p?\.?\s*s\.?)\b",
    r"\bsections?\b",
    r"\btitle\b",
    r"<<|>>|double\s+angul?ar|angle\s+brackets?",
    r"\bquotation\s+marks?|\bdouble\s+quot",
    r"\bwrap(?:ped)?\b",
    r"\*\*\*|\bseparated\s+(?:by|with)\b|\bmarkdown\s+divider",
    r"\b(?:other|same|different|response|answer|entire)\s+language\b|\blanguage\s+(?:other|except)|"
    r"\b(?:in|only)\s+(?:french|german|hindi|spanish|italian|japanese|korean|chinese|"
    r"russian|arabic|portuguese|bengali|marathi|punjabi|tamil|telugu|urdu|gujarati|kannada|nepali|swahili|"
    r"thai|vietnamese|finnish|persian|farsi|turkish|polish|dutch|greek|hebrew)\b",
    r"\b(?:repeat|copy)\b.*\b(?:request|prompt|question|instruction)|\bword\s+for\s+word\b",
    rf"\b(?:two|2)\s+(?:different\s+)?{_RESPONSE}s\b|\b(?:six\s+)?asterisk\s+symbols\b",
    rf"\b(?:end|finish|conclude|start|begin)\s+(?:your|the|each|every|it)\s+(?:entire\s+)?(?:{_RESPONSE}|paragraph|"
    rf"sentence|section|with)",
    rf"\b(?:your|the|entire|whole)\s+(?:entire\s+|whole\s+)?{_RESPONSE}\s+(?:should|must|needs?|has|have|is|will|"
    rf"may|can|contains?|includes?)",
    r"\b(?:do\s+not|don't|never|avoid|without)\s+(?:use|using|include|including|mention|mentioning|say|saying|"
    r"write|writing|add|adding|any)\b",
    r"\b(?:include|including|use|using|mention|contain)s?\s+(?:the\s+(?:words?|keywords?|letters?|phrase)|"
    r"at\s+least|at\s+most|exactly|no\s+more|fewer|less)",
    r"\bmy\s+answer\s+is\b|\bchoose\s+from\b|\bfollowing\s+options\b",
    r"\bno\s+other\s+(?:language|words|text)\b",
    r"\b(?:is\s+there\s+anything\s+else|let\s+me\s+know)\b",
    r"\bfirst\s+word\b|\bparagraph\s+(?:#|number)?\s*\d\b",
    r"\bin\s+(?:your|the)\s+(?:entire\s+)?(?:response|answer|reply)\b",
    r"\b(?:first|second|third|fourth|fifth|last|final|\d+(?:st|nd|rd|th))\s+paragraph\b",
    r"\bvery\s+(?:end|beginning|start)\b|\bfollow\s+this\s+phrase\b",
    r"\b(?:mention|include|use|say)\s+[\"'“‘]",
    r"\b(?:at\s+least|at\s+most|only|exactly|more\s+than|less\s+than)\s+(?:once|twice|thrice)\b",
    r"\b(?:label|mark)(?:ed)?\s+(?:each|every|the|them|it|with)\b",
    r"\b(?:your|the)\s+(?:entire|whole)\s+(?:response|answer|output|reply)\b",
]
_PATTERNS = re.compile("|".join(f"(?P<r{i}>{p})" for i, p in enumerate(CONSTRAINT_PATTERNS)), re.IGNORECASE)

# Word classes let the scorer carry what it learned about one word to its kin.
_CLASSES = {
    "UNIT": "word words sentence sentences paragraph paragraphs line lines bullet bullets point points item items "
    "letter letters character characters syllable syllables stanza stanzas verse verses section sections emoji "
    "emojis comma commas sentence-long chars tokens hashtags hashtag question questions part parts chapter "
    "chapters step steps tip tips reason reasons example examples option options idea ideas row rows column columns",
    "ANSWER": "response responses answer answers reply replies output outputs it yours result text",
    "QUANT": "least most exactly under over fewer less more maximum minimum max min only tops limit limited cap "
    "within roughly about around approximately between precisely no",
    "MODAL": "must should need needs have has ensure make sure remember keep stick try aim please don't do not "
    "never avoid always only can't cannot mustn't shouldn't",
    "FORMAT": "json markdown bold italic italics table tables bullet bulleted numbered heading headings header headers "
    "uppercase lowercase capital capitals caps capitalized title quotes quotation quoted brackets parentheses "
    "code block fenced csv yaml xml html list lists format formatted template structure indent indented "
    "hyphen dash asterisk asterisks emoji emojis hashtag period periods punctuation exclamation colon semicolon "
    "placeholder placeholders underline label labels labeled labelled prefix suffix",
    "POSITION": "start starts begin begins beginning end ends ending finish finishes close closing open opening "
    "first last final conclude concludes sign",
    "EACH": "each every all per any whole entire",
    "LANG": "english french german spanish italian japanese korean chinese russian arabic portuguese hindi dutch "
    "greek hebrew turkish polish swedish latin swahili vietnamese thai bengali urdu tamil persian language",
    "TONE": "tone formal informal casual friendly polite playful serious humorous funny style voice register "
    "audience pirate shakespearean sarcastic professional enthusiastic upbeat",
}
_CLASSES["NUM"] = _NUMBER_WORDS
_CLASS_OF = {word: name for name, words in _CLASSES.items() for word in words.split()}

_SENTENCE = re.compile(r".*?(?:[.!?]+[\"')\]]*(?=\s|$)|\n|$)")
_ABBREVIATIONS = re.compile(r"\b(?:P\.P\.S|P\.S|e\.g|i\.e|etc|Mr|Mrs|Dr|vs|U\.S)\.$", re.IGNORECASE)
# where a sentence may turn from the task to a constraint: punctuation, conjunctions and the words that
# usually open a constraint ("... in all capital letters", "... of exactly 2 paragraphs", "... so that ...")
_PHRASE = re.compile(
    r"[,;:]\s*|\s+[-–—]+\s+|\s+(?=(?:and|but|while|also|then|plus|in|of|with|without|using|that|which|where|"
    r"so\s+that|making|ensuring|including|keeping|as|no|nothing|only|under|within|each|every|followed|starting|"
    r"beginning|ending|like|for|"
    # a constraint run on after the task without a break ("caption for my dog end with 3 hashtags")
    r"end|start|begin|keep|make\s+sure|answer|reply|respond|limit|stick|avoid|don't|do\s+not|never|max|"
    r"include|put|format|add|use|please|it\s+(?:should|must|has|needs))\b)",
    re.IGNORECASE,
)
_TASK_OPENING = re.compile(
    r"(?:please\s+|can\s+you\s+|could\s+you\s+|now\s+|i\s+(?:want|need|would\s+like)\s+(?:you\s+)?(?:to\s+)?)?"
    r"(?:write|create|generate|rewrite|compose|give|describe|explain|summari[sz]e|draft|tell|list|provide|"
    r"come\s+up|design|plan|make\s+(?:a|an|me)|produce|suggest|name|help|imagine|pretend|elaborate|expand|"
    r"critique|translate|answer|what|why|how|who|when|where|is|are|do|does)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+|[^\w\s]")
_LIST_MARKER = re.compile(r"(?:[-*•]|\d+[.)]|[a-z][.)])\s", re.IGNORECASE)
_KEY_VALUE = re.compile(r"[A-Z][\w #/().-]{0,30}:\s+\S")
_BLANK_LINE = re.compile(r"\n\s*\n")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
_PASSAGE_LENGTH = 60
_OPENER = re.compile(
    r"\s*(?:(?:also|first|firstly|second|finally|lastly|additionally|plus|oh|ok|okay|so|now|btw|note|remember),?|"
    r"please|make\s+sure|ensure|be\s+sure)?\s*",
    re.IGNORECASE,
)
_LEADING_JOIN = re.compile(r"(?:and|then|also|plus|&)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class Phrase:
    """A candidate piece of a sentence, with its place in the prompt."""

    start: int
    end: int
    sentence: int


def sentences(text: str) -> list[CharSpan]:
    """Sentence and line spans (stripped), not cutting after abbreviations such as "P.S." or "e.g."."""
    spans: list[CharSpan] = []
    start = 0
    for match in _SENTENCE.finditer(text):
        end = match.end()
        if end == match.start():
            continue
        if (
            end < len(text)
            and text[end : end + 1] != "\n"
            and (_ABBREVIATIONS.search(text[start:end]) or _LIST_MARKER.fullmatch(text[start:end].strip() + " "))
        ):
            continue
        spans.append((start, end))
        start = end
    if start < len(text):
        spans.append((start, len(text)))
    return [_strip(text, s, e) for s, e in spans if text[s:e].strip()]


def phrases(text: str) -> list[Phrase]:
    """Every sentence cut into the phrases the scorer judges one by one."""
    found = []
    for index, (start, end) in enumerate(sentences(text)):
        cuts = [start, *(m.end() for m in _PHRASE.finditer(text, start, end)), end]
        pieces = [_strip(text, a, b) for a, b in zip(cuts, cuts[1:])]
        pieces = [(a, b) for a, b in pieces if b > a]
        joined: list[CharSpan] = []
        for a, b in pieces:  # a lone word ("and", "also,", "lantern,") is judged with what follows it
            if joined and len(text[joined[-1][0] : joined[-1][1]].split()) == 1:
                a = joined.pop()[0]
            joined.append((a, b))
        found += [Phrase(a, b, index) for a, b in joined]
    return found


def _strip(text: str, start: int, end: int) -> CharSpan:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _words(text: str) -> list[str]:
    return ["#" if w.isdigit() else w for w in _WORD.findall(text.lower())]


def _bucket(count: int) -> str:
    return "1" if count <= 1 else "2" if count == 2 else "3-4" if count <= 4 else "5-8" if count <= 8 else "9+"


def features(text: str, cut: list[Phrase], labels: list[bool] | None = None) -> Iterator[list[str]]:
    """Each phrase's features, in order. Whether a colon opened a constraint's list or material to work
    on needs the verdict on the phrase before: the given ``labels`` when training, else the caller
    sends each verdict back into the generator."""
    masked = _QUOTED.sub(lambda m: " " * len(m.group()) if len(m.group()) > _PASSAGE_LENGTH else m.group(), text)
    spans = sentences(text)
    rules: dict[int, list[str]] = {}
    for match in _PATTERNS.finditer(masked):
        rules.setdefault(match.start(), []).append("rule:" + (match.lastgroup or ""))
    by_sentence: dict[int, list[int]] = {}
    for i, phrase in enumerate(cut):
        by_sentence.setdefault(phrase.sentence, []).append(i)
    blocks = [len(_BLANK_LINE.findall(text, 0, start)) for start, _ in spans]
    block_sizes = Counter(blocks)
    # what a colon opened and the phrases after it continue: a constraint's list or template ("... one of:",
    # "... this format:") or material to work on ("Article:", "Here is my poem:"), until a blank line
    chain, crossing, previous_end = "", False, 0
    for index, (s_start, s_end) in enumerate(spans):
        members = by_sentence.get(index, [])
        sentence_text = masked[s_start:s_end]
        sentence_words = _words(sentence_text)
        # the sentence around a phrase, by word class only: which of a sentence's phrases constrains is
        # told by the phrase's own words (whole-sentence words made task phrases look like constraints)
        context = list({f"sc:{_CLASS_OF[w]}" for w in sentence_words if w in _CLASS_OF})
        if "you" in sentence_words or "your" in sentence_words:
            context.append("s:you")
        shared = [
            f"s0:{sentence_words[0] if sentence_words else ''}",
            f"sn:{_bucket(len(sentence_words) // 4)}",
        ]
        if _TASK_OPENING.match(text, s_start):
            shared.append("task_opening")
        if sentence_text.rstrip().endswith("?"):
            shared.append("question")
        if sentence_text.rstrip().endswith(":"):
            shared.append("ends_colon")
        if _LIST_MARKER.match(text, s_start):
            shared.append("list_item")
        if _KEY_VALUE.match(text, s_start):
            shared.append("key_value")
        shared.append(f"block:{_bucket(block_sizes[blocks[index]])}")
        if index == 0:
            shared.append("first_sentence")
        elif "\n\n" in text[spans[index - 1][1] : s_start]:
            shared.append("after_blank_line")
        elif "\n" in text[spans[index - 1][1] : s_start]:
            shared.append("after_newline")
        if index > 0 and text[spans[index - 1][1] - 1] == ":":
            shared.append("after_colon")
        if s_end - s_start > 0 and masked[s_start:s_end].count(" ") > 0.6 * (s_end - s_start):
            shared.append("passage")
        for position, i in enumerate(members):
            phrase = cut[i]
            words = _words(masked[phrase.start : phrase.end])
            names = [f"w:{w}" for w in words]
            classes = [_CLASS_OF.get(w, "#" if w == "#" else "-") for w in words]
            names += [f"c:{c}" for c in classes if c != "-"]
            names += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
            names += [f"cb:{a} {b}" for a, b in zip(classes, classes[1:]) if a != "-" or b != "-"]
            names.append(f"p0:{words[0] if words else ''}")
            names.append(f"pn:{_bucket(len(words))}")
            names.append("pos:first" if position == 0 else "pos:last" if position == len(members) - 1 else "pos:mid")
            names += [r for offset, found in rules.items() if phrase.start <= offset < phrase.end for r in found]
            if any(q in text[phrase.start : phrase.end] for q in "\"'“‘"):
                names.append("quote")
            if chain and not crossing and _BLANK_LINE.search(text, previous_end, phrase.start):
                chain = ""
            if chain:
                names.append(f"in_{chain}" if position else f"in_{chain}_line")
            if sum(map(text[phrase.start : phrase.end].count, "{}();=<>")) >= 3:
                names.append("symbols")
            positive = yield names + shared + context
            if labels is not None:
                positive = labels[i]
            if masked[phrase.end - 1] == ":":
                chain, crossing = ("constraint" if positive else "material"), True
            else:
                crossing = False
                if chain == "constraint" and not positive:
                    chain = ""
            previous_end = phrase.end


@dataclass(frozen=True)
class SpanScorer:
    """A linear scorer over phrase features: a phrase constrains when its weights and the bias sum
    above the threshold. :func:`shipped_scorer` is the one trained for this release."""

    weights: dict[str, float]
    bias: float
    threshold: float

    def spans(self, prompt: str) -> list[CharSpan]:
        """``[start, end)`` character spans of ``prompt`` that state constraints on the response."""
        cut = phrases(prompt)
        chosen: list[bool] = []
        stream = features(prompt, cut)
        try:
            names = next(stream)
            while True:
                chosen.append(self.bias + sum(self.weights.get(name, 0.0) for name in names) > self.threshold)
                names = stream.send(chosen[-1])
        except StopIteration:
            pass
        return spans_of(prompt, cut, chosen)


@cache
def shipped_scorer() -> SpanScorer:
    model = json.loads(SCORER.read_text())
    if model["version"] != DETECTOR:
        raise RuntimeError(f"{SCORER} holds scorer {model['version']!r}, this code expects {DETECTOR!r}")
    return SpanScorer(model["weights"], model["bias"], model["threshold"])


def find_instruction_spans(prompt: str) -> list[CharSpan]:
    """``[start, end)`` character spans of ``prompt`` that state constraints on the response."""
    return shipped_scorer().spans(prompt)


def spans_of(text: str, cut: list[Phrase], chosen: list[bool]) -> list[CharSpan]:
    """Character spans from the phrases judged to constrain: per sentence, from the first to the last of
    them; an opening word before the first (``"Also, ..."``, ``"Make sure ..."``) and a short tail after
    the last (``"... at least twice."``) belong to the span; a joining "and" or "then" does not."""
    spans = sentences(text)
    found: list[CharSpan] = []
    for index, (s_start, s_end) in enumerate(spans):
        members = [p for p, keep in zip(cut, chosen) if keep and p.sentence == index]
        if not members:
            continue
        start, end = members[0].start, members[-1].end
        if _OPENER.fullmatch(text, s_start, start):
            start = s_start
        if len(text[end:s_end].split()) <= 3:
            end = s_end
        join = _LEADING_JOIN.match(text, start)
        if join and start > s_start:
            start = join.end()
        found.append((start, end))
    return _merge(text, found)


def _merge(text: str, spans: list[CharSpan]) -> list[CharSpan]:
    """Join spans separated only by whitespace or a list marker such as "2."."""
    merged: list[CharSpan] = []
    for start, end in spans:
        if merged and (start <= merged[-1][1] or len(text[merged[-1][1] : start].strip()) <= 3):
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def character_scores(
    texts: list[str], predicted: list[list[CharSpan]], gold: list[list[CharSpan]]
) -> tuple[float, float]:
    """Character-level precision and recall of predicted spans against gold (whitespace ignored)."""
    hits = predicted_total = gold_total = 0
    for text, pred, true in zip(texts, predicted, gold):
        pred_chars = {i for a, b in pred for i in range(a, b) if not text[i].isspace()}
        gold_chars = {i for a, b in true for i in range(a, b) if not text[i].isspace()}
        hits += len(pred_chars & gold_chars)
        predicted_total += len(pred_chars)
        gold_total += len(gold_chars)
    return hits / max(predicted_total, 1), hits / max(gold_total, 1)
