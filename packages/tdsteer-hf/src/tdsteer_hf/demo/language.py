"""The demo language: a seeded grammar of short reviews whose sentiment is a knob.

A review is about something in one of six domains (a film, a meal, a book, a hotel, a concert, a
trip) and two to four sentences long. It has a sentiment, ``"positive"``, ``"negative"`` or
``"neutral"``: a positive review mixes neutral sentences with judging ones whose adjectives, verbs
and interjections come from :data:`POSITIVE_WORDS` (``"the soup was wonderful ."``,
``"wow , my sister loved the film ."``), a negative one draws them from :data:`NEGATIVE_WORDS`, and
a neutral one has only neutral sentences (``"i watched the film on monday ."``). Sentiment lives in
those words only, so the fraction of positive words in a text measures it. A quiz is a review whose
sentences each have their own sentiment, followed by an A/B question in the CAA format whose answer
follows the majority (:meth:`Grammar.quiz`). Text is lower case with spaces around punctuation; the
vocabulary (:data:`VOCABULARY`) has a few hundred tokens.

Everything is drawn from a :class:`random.Random` seeded by the caller, so a seed gives the same
texts on every platform and Python version.

Examples:
    >>> grammar = Grammar(seed=0)
    >>> positive, negative = grammar.pair()
    >>> len(positive.split()) == len(negative.split())
    True
    >>> positive_fraction(["the film was wonderful .", "the film was awful ."])
    0.125
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from tdsteer_hf.data import CAA_SEPARATOR

Sentiment = Literal["positive", "negative", "neutral"]
SENTIMENTS: tuple[Sentiment, ...] = ("positive", "negative", "neutral")

#: Nouns of each domain, and the verbs that say what one did with them without judging.
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "film": (
        ("film", "movie", "plot", "story", "ending", "music", "cast", "script", "scene", "hero", "villain")
        + ("soundtrack", "dialogue", "cinema", "screen"),
        ("watched", "saw", "rented", "streamed"),
    ),
    "meal": (
        ("food", "meal", "soup", "bread", "pasta", "pizza", "salad", "dessert", "coffee", "tea", "service")
        + ("waiter", "menu", "chef", "wine", "cake", "restaurant", "cafe"),
        ("ate", "ordered", "tried", "shared"),
    ),
    "book": (
        ("book", "novel", "chapter", "author", "cover", "poem", "tale", "writer", "page", "title", "sequel")
        + ("library",),
        ("read", "bought", "borrowed", "finished"),
    ),
    "hotel": (
        ("hotel", "room", "bed", "staff", "view", "pool", "lobby", "breakfast", "garden", "beach", "balcony")
        + ("shower", "receptionist"),
        ("visited", "booked", "saw", "used"),
    ),
    "concert": (
        ("concert", "band", "singer", "song", "album", "show", "stage", "crowd", "guitar", "drummer", "melody")
        + ("encore", "festival"),
        ("heard", "attended", "watched", "recorded"),
    ),
    "trip": (
        ("trip", "park", "museum", "tour", "guide", "train", "city", "river", "walk", "castle", "bridge")
        + ("market", "island"),
        ("visited", "took", "saw", "explored"),
    ),
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


POSITIVE_ADJECTIVES = _words(
    "good great wonderful excellent lovely brilliant delightful amazing superb fantastic charming beautiful "
    "perfect pleasant delicious nice"
)
NEGATIVE_ADJECTIVES = _words(
    "bad terrible awful horrible dreadful boring dull poor disappointing unpleasant nasty ugly miserable "
    "annoying rude tasteless"
)
POSITIVE_VERBS = _words("loved enjoyed liked adored admired praised")
NEGATIVE_VERBS = _words("hated disliked loathed despised regretted detested")
NEUTRAL_ADJECTIVES = _words(
    "long short new old large small red blue green brown white black tall round wooden modern simple local "
    "usual early late full busy quiet"
)
PERSONS = _words(
    "friend sister brother mother father wife husband son daughter family partner neighbour colleague uncle aunt cousin"
)
DAYS = _words("monday tuesday wednesday thursday friday saturday sunday")
PERIODS = _words("week month year night summer winter")
NUMBERS = _words("two three four five six seven eight nine ten")
INTENSIFIERS = _words("really very truly quite so")
POSITIVE_INTERJECTIONS = _words("wow yay")
NEGATIVE_INTERJECTIONS = _words("ugh alas")

#: Probability that a sentence of a positive or negative review judges (else it is neutral).
JUDGING = 0.8
#: Probability that a judging sentence opens with an interjection ("wow , ...", "ugh , ..."): the
#: sentiment of a review then also tells how its next sentence starts.
INTERJECTING = 0.3
#: Share of neutral documents in the training stream.
NEUTRAL_RATE = 0.25

#: Words that carry positive sentiment in the demo language (adjectives, verbs and interjections).
POSITIVE_WORDS: frozenset[str] = frozenset((*POSITIVE_ADJECTIVES, *POSITIVE_VERBS, *POSITIVE_INTERJECTIONS))
#: Words that carry negative sentiment in the demo language.
NEGATIVE_WORDS: frozenset[str] = frozenset((*NEGATIVE_ADJECTIVES, *NEGATIVE_VERBS, *NEGATIVE_INTERJECTIONS))

# Sentences that judge: {s} and {s2} are sentiment adjectives, {v} a sentiment verb.
SENTIMENT_TEMPLATES = (
    "the {n} was {s} .",
    "the {n} was {i} {s} .",
    "i {v} the {n} .",
    "my {p} {v} the {n} .",
    "we {v} the {n} .",
    "the {n} was {s} and the {n2} was {s2} .",
    "it was {i} {s} .",
    "everyone {v} the {n} .",
    "i {v} it .",
    "the {n} and the {n2} were {s} .",
    "my {p} said the {n} was {s} .",
    "i thought the {n} was {s} .",
)
# Sentences that only tell: {na} is a neutral adjective, {nv} a neutral verb of the domain.
NEUTRAL_TEMPLATES = (
    "i {nv} the {n} on {d} .",
    "we {nv} the {n} last {per} .",
    "my {p} {nv} the {n} with me .",
    "the {n} was {na} .",
    "the {n} was {i} {na} .",
    "it took {num} hours .",
    "there were {num} people .",
    "the {n} and the {n2} were {na} .",
    "my {p} said the {n} was {na} .",
    "i went there with my {p} on {d} .",
    "we paid {num} dollars for the {n} .",
    "we sat near the {n2} .",
)
QUESTION = "would you recommend the {n} ? Choices: (A) {a} (B) {b}"

_WORD = re.compile(r"\w+|[^\w\s]+")


def _tokens(text: str) -> list[str]:
    """The tokens the demo tokenizer sees: lower-cased words and runs of punctuation."""
    return _WORD.findall(re.sub(r"\{\w+\}", " ", text).lower())


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for nouns, verbs in DOMAINS.values():
        words.update(nouns + verbs)
    lists = (POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_ADJECTIVES)
    for group in (
        *lists,
        PERSONS,
        DAYS,
        PERIODS,
        NUMBERS,
        INTENSIFIERS,
        POSITIVE_INTERJECTIONS,
        NEGATIVE_INTERJECTIONS,
    ):
        words.update(group)
    for template in (*SENTIMENT_TEMPLATES, *NEUTRAL_TEMPLATES, QUESTION, CAA_SEPARATOR, "(A) (B) yes no ,"):
        words.update(_tokens(template))
    return tuple(sorted(words))


#: Every token of the language (words and punctuation), sorted; the demo tokenizer's vocabulary.
VOCABULARY: tuple[str, ...] = _vocabulary()


def words(text: str) -> list[str]:
    """The words of ``text`` (lower case, punctuation dropped).

    Examples:
        >>> words("The film was great.")
        ['the', 'film', 'was', 'great']
    """
    return re.findall(r"[a-z]+", text.lower())


def positive_fraction(texts: Iterable[str]) -> float:
    """Fraction of the words of ``texts`` that are in :data:`POSITIVE_WORDS` (0 for no words).

    Examples:
        >>> positive_fraction(["i loved it .", "it was long ."])
        0.16666666666666666
    """
    found = [word for text in texts for word in words(text)]
    return sum(word in POSITIVE_WORDS for word in found) / len(found) if found else 0.0


def negative_fraction(texts: Iterable[str]) -> float:
    """Fraction of the words of ``texts`` that are in :data:`NEGATIVE_WORDS` (0 for no words).

    Examples:
        >>> negative_fraction(["i hated it ."])
        0.3333333333333333
    """
    found = [word for text in texts for word in words(text)]
    return sum(word in NEGATIVE_WORDS for word in found) / len(found) if found else 0.0


class Grammar:
    """A seeded generator of sentences, reviews, A/B questions and contrastive pairs of the language.

    Args:
        seed: Seed of the generator's :class:`random.Random` (an int, or a string such as
            ``"0:train"``); the same seed draws the same texts.

    Examples:
        >>> grammar = Grammar(seed=1)
        >>> text = grammar.review("neutral")
        >>> any(word in POSITIVE_WORDS | NEGATIVE_WORDS for word in words(text))
        False
        >>> Grammar(seed=1).review("neutral") == text
        True
    """

    def __init__(self, seed: int | str) -> None:
        self.random = random.Random(seed)

    def _pick(self, options: Sequence[str]) -> str:
        return options[self.random.randrange(len(options))]

    def domain(self) -> str:
        """A domain name drawn uniformly (a key of :data:`DOMAINS`)."""
        return self._pick(sorted(DOMAINS))

    def _slots(self, domain: str) -> dict[str, str]:
        nouns, verbs = DOMAINS[domain]
        first = self._pick(nouns)
        second = self._pick([noun for noun in nouns if noun != first])
        return {
            "n": first,
            "n2": second,
            "nv": self._pick(verbs),
            "na": self._pick(NEUTRAL_ADJECTIVES),
            "p": self._pick(PERSONS),
            "d": self._pick(DAYS),
            "per": self._pick(PERIODS),
            "num": self._pick(NUMBERS),
            "i": self._pick(INTENSIFIERS),
        }

    def _judging(self, sentiment: Literal["positive", "negative"]) -> dict[str, str]:
        positive = sentiment == "positive"
        adjectives = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
        return {
            "s": self._pick(adjectives),
            "s2": self._pick(adjectives),
            "v": self._pick(POSITIVE_VERBS if positive else NEGATIVE_VERBS),
            "x": self._pick(POSITIVE_INTERJECTIONS if positive else NEGATIVE_INTERJECTIONS),
        }

    def _judge(self, template: str, slots: dict[str, str], judging: dict[str, str], interject: bool) -> str:
        return ("{x} , " if interject else "").format(**judging) + template.format(**slots, **judging)

    def sentence(self, sentiment: Sentiment, domain: str | None = None) -> str:
        """One sentence: a judging one with words of ``sentiment``, or a neutral one.

        A judging sentence opens with an interjection of its sentiment with probability
        :data:`INTERJECTING`.

        Args:
            sentiment: ``"positive"``, ``"negative"`` or ``"neutral"``.
            domain: Domain of the nouns (drawn when ``None``).

        Returns:
            The sentence, ending with ``" ."``.
        """
        slots = self._slots(domain or self.domain())
        if sentiment == "neutral":
            return self._pick(NEUTRAL_TEMPLATES).format(**slots)
        template = self._pick(SENTIMENT_TEMPLATES)
        return self._judge(template, slots, self._judging(sentiment), self.random.random() < INTERJECTING)

    def review(self, sentiment: Sentiment, *, sentences: int | None = None, domain: str | None = None) -> str:
        """A review: neutral sentences, and for a positive or negative one judging sentences too.

        Args:
            sentiment: The review's sentiment; a judging review has at least one judging sentence,
                and each sentence judges with probability :data:`JUDGING`.
            sentences: Number of sentences (2 to 4, drawn, when ``None``).
            domain: Domain of the review (drawn when ``None``).

        Returns:
            The sentences joined by spaces.
        """
        domain = domain or self.domain()
        count = sentences if sentences is not None else self.random.randint(2, 4)
        kinds: list[Sentiment] = [
            sentiment if sentiment != "neutral" and self.random.random() < JUDGING else "neutral" for _ in range(count)
        ]
        if sentiment != "neutral" and sentiment not in kinds:
            kinds[self.random.randrange(count)] = sentiment
        return " ".join(self.sentence(kind, domain) for kind in kinds)

    def question(self, domain: str, positive_first: bool | None = None) -> tuple[str, str, str]:
        """An A/B question about a thing of ``domain``: would you recommend it, yes or no.

        "yes" is the positive answer. The options carry no sentiment word, so the answer depends on
        the sentiment of what came before the question only.

        Args:
            domain: Domain of the thing asked about.
            positive_first: Whether "yes" is (A) (drawn when ``None``).

        Returns:
            ``(question, positive_letter_answer, negative_letter_answer)``, e.g.
            ``("would you recommend the soup ? Choices: (A) yes (B) no", "(A)", "(B)")``.
        """
        noun = self._pick(DOMAINS[domain][0])
        if positive_first is None:
            positive_first = self.random.random() < 0.5
        if positive_first:
            return QUESTION.format(n=noun, a="yes", b="no"), "(A)", "(B)"
        return QUESTION.format(n=noun, a="no", b="yes"), "(B)", "(A)"

    def quiz(self) -> str:
        """A mixed review, an A/B question about it, and the answer that agrees with its majority.

        The review has one to three sentences, each positive, negative or neutral at random; the
        answer is the positive one when positive sentences outnumber negative ones, the negative one
        when they are outnumbered, and either at random on a tie (a neutral review among them). So
        the answer follows the balance of sentiment in the review, and a review without any is a
        coin toss. The text is what :func:`tdsteer_hf.contrastive_batches` builds from a CAA item:
        ``question + "\\n\\nAnswer: " + "(A)"``.
        """
        domain = self.domain()
        kinds = [SENTIMENTS[self.random.randrange(3)] for _ in range(self.random.randint(1, 3))]
        review = " ".join(self.sentence(kind, domain) for kind in kinds)
        question, positive, negative = self.question(domain)
        balance = kinds.count("positive") - kinds.count("negative")
        if balance == 0:
            answer = self._pick([positive, negative])
        else:
            answer = positive if balance > 0 else negative
        return f"{review} {question}{CAA_SEPARATOR}{answer}"

    def document(self, quiz_rate: float = 0.4) -> str:
        """A training document: a review, or a quiz with probability ``quiz_rate``.

        A review is neutral with probability :data:`NEUTRAL_RATE`, else positive or negative with
        equal chances.
        """
        if self.random.random() < quiz_rate:
            return self.quiz()
        draw = self.random.random()
        sentiment: Sentiment = (
            "neutral" if draw < NEUTRAL_RATE else "positive" if draw < 0.5 + NEUTRAL_RATE / 2 else "negative"
        )
        return self.review(sentiment)

    def pair(self) -> tuple[str, str]:
        """The positive and negative version of the same short text (only the judging words differ).

        Returns:
            ``(positive, negative)``: an optional neutral sentence, then a judging sentence.
        """
        domain = self.domain()
        lead = self.sentence("neutral", domain) + " " if self.random.random() < 0.5 else ""
        template = self._pick(SENTIMENT_TEMPLATES)
        slots = self._slots(domain)
        interject = self.random.random() < INTERJECTING
        positive = lead + self._judge(template, slots, self._judging("positive"), interject)
        negative = lead + self._judge(template, slots, self._judging("negative"), interject)
        return positive, negative

    def ab_item(self, positive_first: bool | None = None) -> dict[str, str]:
        """An A/B item in the CAA format after a neutral review; matching behaviour = the positive answer.

        Args:
            positive_first: Whether the positive answer is (A) (drawn when ``None``).
        """
        domain = self.domain()
        review = self.review("neutral", sentences=self.random.randint(1, 2), domain=domain)
        question, positive, negative = self.question(domain, positive_first)
        return {
            "question": f"{review} {question}",
            "answer_matching_behavior": positive,
            "answer_not_matching_behavior": negative,
        }
