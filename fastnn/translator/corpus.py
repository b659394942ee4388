"""The built-in Korean→English corpus: compositional sentences generated from small grammars and lexicons.

Offline, license-free and deterministic, so `fastnn-translate train` works anywhere and its BLEU is comparable
between runs. The grammar is small but exercises what makes ko→en hard for a model: SOV→SVO reordering,
particles whose form depends on the previous syllable (은/는, 을/를), native-Korean counters with plural
English nouns, sino-Korean dates and prices copied as digits, tense, negation, questions with do-support and
subject–verb agreement.

Every sentence is a pure function of a random.Random, and the splits are cut from one fixed stream with the
test and dev sentences removed from training, so the test split is the same for every training size.
"""
from __future__ import annotations

import random

# --- Hangul helpers --------------------------------------------------------------------------------------
_BASE, _JONG = 0xAC00, 28
_RIEUL = 8  # index of the final consonant ㄹ


def _has_final(word: str) -> bool:
    """Whether the last syllable ends in a consonant (batchim): decides 은/는, 을/를, 이/가."""
    c = ord(word[-1]) - _BASE
    if 0 <= c < 11172:
        return c % _JONG != 0
    return word[-1] in "0136778"  # digits read as 영 일 삼 육 칠 팔 end in a consonant


def topic(word: str) -> str:
    return word + ("은" if _has_final(word) else "는")


def obj(word: str) -> str:
    return word + ("을" if _has_final(word) else "를")


def _drop_rieul(stem: str) -> str:
    c = ord(stem[-1]) - _BASE
    return stem[:-1] + chr(ord(stem[-1]) - _RIEUL) if 0 <= c < 11172 and c % _JONG == _RIEUL else stem


# --- lexicon ---------------------------------------------------------------------------------------------
# Subjects: Korean, English, English person/number ("1s", "2", "3s", "1p", "3p") for agreement.
SUBJECTS = [
    ("나", "I", "1s"), ("너", "you", "2"), ("그", "he", "3s"), ("그녀", "she", "3s"), ("우리", "we", "1p"),
    ("그들", "they", "3p"), ("내 친구", "my friend", "3s"), ("선생님", "the teacher", "3s"),
    ("그 학생", "the student", "3s"), ("우리 어머니", "my mother", "3s"), ("우리 아버지", "my father", "3s"),
    ("내 동생", "my brother", "3s"), ("그 의사", "the doctor", "3s"), ("아이들", "the children", "3p"),
]

# Verbs: Korean stem, present (plain style), past, future adnominal; English base, past, 3rd singular.
class Verb:
    def __init__(self, stem, present, past, fut, base, en_past, en_3s, objects=(), places=None):
        self.stem, self.present, self.past, self.fut = stem, present, past, fut
        self.base, self.en_past, self.en_3s = base, en_past, en_3s
        self.objects, self.places = objects, places


# Nouns: Korean, English singular, English plural, counter (native-Korean count word).
FOOD = [("사과", "apple", "apples", "개"), ("빵", "bread roll", "bread rolls", "개"),
        ("바나나", "banana", "bananas", "개"), ("케이크", "cake", "cakes", "개"), ("샌드위치", "sandwich",
        "sandwiches", "개"), ("오렌지", "orange", "oranges", "개"), ("달걀", "egg", "eggs", "개")]
DRINK = [("커피", "coffee", "cups of coffee", "잔"), ("물", "water", "glasses of water", "잔"),
         ("우유", "milk", "glasses of milk", "잔"), ("차", "tea", "cups of tea", "잔"),
         ("주스", "juice", "glasses of juice", "잔")]
BOOK = [("책", "book", "books", "권"), ("소설", "novel", "novels", "권"), ("잡지", "magazine", "magazines", "권"),
        ("신문", "newspaper", "newspapers", "부"), ("편지", "letter", "letters", "통")]
THING = [("가방", "bag", "bags", "개"), ("우산", "umbrella", "umbrellas", "개"), ("시계", "watch", "watches", "개"),
         ("모자", "hat", "hats", "개"), ("컴퓨터", "computer", "computers", "대"), ("자전거", "bicycle",
         "bicycles", "대"), ("꽃", "flower", "flowers", "송이"), ("표", "ticket", "tickets", "장")]
ANIMAL = [("고양이", "cat", "cats", "마리"), ("개", "dog", "dogs", "마리"), ("새", "bird", "birds", "마리"),
          ("말", "horse", "horses", "마리"), ("물고기", "fish", "fish", "마리")]
PEOPLE = [("친구", "friend", "friends", "명"), ("학생", "student", "students", "명"),
          ("손님", "guest", "guests", "명"), ("아이", "child", "children", "명")]
LETTERS = [("편지", "letter", "letters", "통"), ("이메일", "email", "emails", "통")]

# Places: Korean, "at" phrase (where something happens), "to" phrase (where someone goes).
PLACES = [("학교", "at school", "to school"), ("집", "at home", "home"), ("공원", "in the park", "to the park"),
          ("도서관", "at the library", "to the library"), ("식당", "at the restaurant", "to the restaurant"),
          ("시장", "at the market", "to the market"), ("회사", "at the office", "to the office"),
          ("병원", "at the hospital", "to the hospital"), ("카페", "at the cafe", "to the cafe"),
          ("서울", "in Seoul", "to Seoul"), ("부산", "in Busan", "to Busan"), ("역", "at the station",
          "to the station")]

VERBS = [
    Verb("먹", "먹는다", "먹었다", "먹을", "eat", "ate", "eats", FOOD),
    Verb("마시", "마신다", "마셨다", "마실", "drink", "drank", "drinks", DRINK),
    Verb("읽", "읽는다", "읽었다", "읽을", "read", "read", "reads", BOOK),
    Verb("사", "산다", "샀다", "살", "buy", "bought", "buys", FOOD + BOOK + THING),
    Verb("팔", "판다", "팔았다", "팔", "sell", "sold", "sells", FOOD + BOOK + THING),
    Verb("만들", "만든다", "만들었다", "만들", "make", "made", "makes", FOOD),
    Verb("보", "본다", "봤다", "볼", "see", "saw", "sees", ANIMAL + THING + PEOPLE),
    Verb("찾", "찾는다", "찾았다", "찾을", "find", "found", "finds", ANIMAL + THING + BOOK),
    Verb("잃어버리", "잃어버린다", "잃어버렸다", "잃어버릴", "lose", "lost", "loses", THING + BOOK),
    Verb("기다리", "기다린다", "기다렸다", "기다릴", "wait for", "waited for", "waits for", PEOPLE),
    Verb("쓰", "쓴다", "썼다", "쓸", "write", "wrote", "writes", LETTERS),
    Verb("보내", "보낸다", "보냈다", "보낼", "send", "sent", "sends", LETTERS + THING),
    Verb("좋아하", "좋아한다", "좋아했다", "좋아할", "like", "liked", "likes", ANIMAL + FOOD + BOOK),
    Verb("키우", "키운다", "키웠다", "키울", "raise", "raised", "raises", ANIMAL),
    Verb("씻", "씻는다", "씻었다", "씻을", "wash", "washed", "washes", FOOD[:1] + THING[:4]),
]
MOTION = [
    Verb("가", "간다", "갔다", "갈", "go", "went", "goes"),
    Verb("오", "온다", "왔다", "올", "come", "came", "comes"),
    Verb("돌아가", "돌아간다", "돌아갔다", "돌아갈", "go back", "went back", "goes back"),
    Verb("뛰어가", "뛰어간다", "뛰어갔다", "뛰어갈", "run", "ran", "runs"),
]
INTRANSITIVE = [  # done at a place
    Verb("공부하", "공부한다", "공부했다", "공부할", "study", "studied", "studies"),
    Verb("일하", "일한다", "일했다", "일할", "work", "worked", "works"),
    Verb("자", "잔다", "잤다", "잘", "sleep", "slept", "sleeps"),
    Verb("노래하", "노래한다", "노래했다", "노래할", "sing", "sang", "sings"),
    Verb("기다리", "기다린다", "기다렸다", "기다릴", "wait", "waited", "waits"),
    Verb("운동하", "운동한다", "운동했다", "운동할", "exercise", "exercised", "exercises"),
]
# Adjectives as predicates: Korean present, past, negation stem; English adjective.
ADJECTIVES = [("크", "크다", "컸다", "big"), ("작", "작다", "작았다", "small"), ("비싸", "비싸다", "비쌌다",
              "expensive"), ("싸", "싸다", "쌌다", "cheap"), ("맛있", "맛있다", "맛있었다", "delicious"),
              ("조용하", "조용하다", "조용했다", "quiet"), ("바쁘", "바쁘다", "바빴다", "busy"),
              ("행복하", "행복하다", "행복했다", "happy"), ("피곤하", "피곤하다", "피곤했다", "tired"),
              ("예쁘", "예쁘다", "예뻤다", "pretty"), ("깨끗하", "깨끗하다", "깨끗했다", "clean"),
              ("무겁", "무겁다", "무거웠다", "heavy"), ("새롭", "새롭다", "새로웠다", "new")]
# Attributive adjectives before a noun: Korean, English.
ATTRIB = [("빨간", "red"), ("큰", "big"), ("작은", "small"), ("새", "new"), ("오래된", "old"),
          ("파란", "blue"), ("비싼", "expensive"), ("좋은", "good")]
INTENSIFIERS = [("아주", "very"), ("정말", "really"), ("조금", "a little")]

NATIVE = ["한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉", "열"]
EN_NUM = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
# Time adverbs and the tenses they allow.
TIMES = [("어제", "yesterday", "past"), ("지난주에", "last week", "past"), ("오늘 아침에", "this morning", "past"),
         ("내일", "tomorrow", "future"), ("다음 주에", "next week", "future"), ("주말에", "on the weekend",
         "future"), ("매일", "every day", "present"), ("보통", "usually", "present"),
         ("가끔", "sometimes", "present")]


# --- English helpers -------------------------------------------------------------------------------------
def _be(person: str, past: bool) -> str:
    if past:
        return "were" if person in ("2", "1p", "3p") else "was"
    return {"1s": "am", "3s": "is"}.get(person, "are")


def _en_verb(v: Verb, tense: str, neg: bool, person: str, question: bool = False) -> tuple[str, str]:
    """(auxiliary or "", main verb phrase) so a question can front the auxiliary."""
    if tense == "future":
        return "will", ("not " if neg else "") + v.base
    if neg or question:
        aux = "did" if tense == "past" else ("does" if person == "3s" else "do")
        return aux, ("not " if neg else "") + v.base
    return "", v.en_past if tense == "past" else (v.en_3s if person == "3s" else v.base)


def _ko_verb(v: Verb, tense: str, neg: bool, question: bool = False) -> str:
    if question:
        if neg:
            return v.stem + "지 않" + {"past": "았니", "present": "니", "future": "을 거니"}[tense]
        return {"past": v.past[:-1] + "니", "present": _drop_rieul(v.stem) + "니", "future": v.fut + " 거니"}[tense]
    if neg:
        return v.stem + "지 " + {"past": "않았다", "present": "않는다", "future": "않을 것이다"}[tense]
    return {"past": v.past, "present": v.present, "future": v.fut + " 것이다"}[tense]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# --- sentence templates ----------------------------------------------------------------------------------
def _noun_phrase(r: random.Random, nouns):
    """(Korean object phrase without particle, English noun phrase, Korean ends with a counter)."""
    ko, sg, pl, counter = r.choice(nouns)
    roll = r.random()
    if roll < 0.4:
        n = r.randrange(10)
        # Korean puts the count after the noun: 사과 세 개 = three apples.
        # Korean puts the count after the noun: 사과 세 개 = three apples; 커피 한 잔 = one cup of coffee.
        en = pl if n else (sg if counter != "잔" else pl.replace("cups", "cup").replace("glasses", "glass"))
        return f"{ko} {NATIVE[n]} {counter}", f"{EN_NUM[n]} {en}"
    if roll < 0.65:
        ak, ae = r.choice(ATTRIB)
        return f"{ak} {ko}", f"the {ae} {sg}"
    return ko, f"the {sg}"


def _time_and_tense(r: random.Random):
    roll = r.random()
    if roll < 0.55:
        return r.choice(TIMES)
    if roll < 0.7:  # a date: sino-Korean digits with 년/월/일, English "on May 3, 2021"
        y, m, d = r.randrange(1990, 2031), r.randrange(12), r.randrange(1, 29)
        return f"{y}년 {m + 1}월 {d}일에", f"on {MONTHS[m]} {d}, {y}", "past" if y < 2026 else "future"
    return None, None, r.choice(["past", "present", "future"])


def _clause(r: random.Random):
    """(ko, en) for one declarative or interrogative clause."""
    sk, se, person = r.choice(SUBJECTS)
    tk, te, tense = _time_and_tense(r)
    time_tense = tense
    neg = r.random() < 0.25
    question = r.random() < 0.15
    if question:  # questions are asked of "you" in Korean's plain style
        sk, se, person = "너", "you", "2"
    kind = r.random()
    place_ko = place_en = None
    if kind < 0.88:  # a verb and its argument: an object (maybe at a place), "to" a place or "at" a place
        if kind < 0.55:
            v = r.choice(VERBS)
            ok, oe = _noun_phrase(r, v.objects)
            if r.random() < 0.3:
                pk, pe, _ = r.choice(PLACES)
                place_ko, place_en = pk + "에서", pe
            arg_ko, arg_en = obj(ok), oe
        else:
            motion = kind < 0.75
            v = r.choice(MOTION if motion else INTRANSITIVE)
            pk, at, to = r.choice(PLACES)
            arg_ko, arg_en = (pk + "에", to) if motion else (pk + "에서", at)
        ko_core = f"{arg_ko} {_ko_verb(v, tense, neg, question)}"
        aux, main = _en_verb(v, tense, neg, person, question)
        en_tail = f"{main} {arg_en}"
    else:  # adjective predicate: "The X is (not) very big." / "I was tired."
        stem, pres, past, adj = r.choice(ADJECTIVES)
        tense = "past" if tense == "past" else "present"
        ik, ie = r.choice(INTENSIFIERS) if r.random() < 0.4 and not neg else ("", "")
        if r.random() < 0.5:
            nk, sg, _, _ = r.choice(FOOD + BOOK + THING + ANIMAL)
            sk, se, person = f"그 {nk}", f"the {sg}", "3s"
        if question:
            ko_pred = stem + ("지 않" if neg else "") + ("았니" if tense == "past" else "니") if neg else \
                (past[:-1] + "니" if tense == "past" else stem + "니")
        elif neg:
            ko_pred = stem + "지 " + ("않았다" if tense == "past" else "않다")
        else:
            ko_pred = past if tense == "past" else pres
        ko_core = (ik + " " if ik else "") + ko_pred
        aux, main = _be(person, tense == "past"), ("not " if neg else "") + (ie + " " if ie else "") + adj
        en_tail = main
        if tense != time_tense:  # "tomorrow" cannot go with "is"/"was": drop the adverb
            tk = te = None
    parts_ko = [p for p in (tk, topic(sk), place_ko, ko_core) if p]
    if question:
        # Korean keeps the order; English fronts the auxiliary ("Did you eat ...?").
        en = f"{_cap(aux)} {se} {en_tail}" + (f" {place_en}" if place_en else "") + (f" {te}" if te else "")
        return " ".join(parts_ko) + "?", en + "?"
    en = f"{_cap(se)} " + (f"{aux} " if aux else "") + en_tail + (f" {place_en}" if place_en else "")
    if te:
        en = f"{_cap(te)}, {en[0].lower() + en[1:] if not en.startswith('I ') else en}" if te[-1].isdigit() \
            else en + f" {te}"  # dates lead, adverbs trail
    return " ".join(parts_ko) + ".", en + "."


def _price(r: random.Random):
    ko, sg, _, _ = r.choice(FOOD + BOOK + THING)
    won = r.randrange(1, 100) * (100 if r.random() < 0.5 else 1000)
    past = r.random() < 0.3
    return (f"그 {topic(ko)} {won:,}원{'이었다' if past else '이다'}.",
            f"The {sg} {'cost' if past else 'costs'} {won:,} won.")


def _because(r: random.Random):
    """Two clauses joined by 그래서 ("so"): longer inputs with more distant reordering."""
    (k1, e1), (k2, e2) = _declarative(r), _declarative(r)
    return f"{k1} 그래서 {k2}", f"{e1[:-1]}, so {e2[0].lower() + e2[1:] if not e2.startswith('I ') else e2}"


def _declarative(r: random.Random):
    while True:
        ko, en = _clause(r)
        if not en.endswith("?"):
            return ko, en


def sentence(r: random.Random) -> tuple[str, str]:
    """One (Korean, English) pair."""
    roll = r.random()
    if roll < 0.07:
        return _price(r)
    if roll < 0.12:
        return _because(r)
    return _clause(r)


SPLITS = {"test": 1000, "dev": 500}
SEED = 20240601


def generate(split: str = "train", size: int = 30000, seed: int = SEED) -> list[tuple[str, str]]:
    """Pairs of a split. dev and test are fixed (the first unique sentences of the stream); train is the next
    `size` unique pairs whose Korean side is in neither, so no test sentence is ever trained on."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"built-in corpus split must be train, dev or test, got {split!r}")
    r = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list] = {"test": [], "dev": [], "train": []}
    order = ["test", "dev", "train"]
    want = {"test": SPLITS["test"], "dev": SPLITS["dev"], "train": size}
    for name in order:
        if name == "train" and split != "train":
            break
        while len(out[name]) < want[name]:
            ko, en = sentence(r)
            if ko in seen:
                continue
            seen.add(ko)
            out[name].append((ko, en))
        if name == split:
            break
    return out[split]
