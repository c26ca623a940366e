"""Passages of the synthetic world: one per entity stating its facts, plus distractors that share its names.

Distractors never contradict an entity passage (they restate true facts or add unrelated ones), so every
question stays answerable uniquely; they exist to make retrieval non-trivial: same titles (career passages),
same surnames (surname lists), same name stems (disambiguation pages) and events that mention many entities.
"""

from __future__ import annotations

import random
from collections import defaultdict

from qa.world_entities import LATEST_YEAR, World
from qa.world_names import NameForge, between, pick

ADJECTIVES = ("quiet", "austere", "lyrical", "bold", "restless", "precise", "generous", "sombre", "playful",
              "meticulous", "ambitious", "unhurried")
SUBJECTS = ("mathematics", "law", "history", "architecture", "chemistry", "music", "economics", "philosophy",
            "geology", "literature")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
EVENT_KINDS = (("Trade Fair", "trade exhibition"), ("Music Festival", "music festival"),
               ("Chess Open", "chess tournament"), ("Marathon", "road race"),
               ("Science Congress", "scientific meeting"), ("Book Fair", "book fair"))
MAX_WORDS = 120


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(word: str) -> str:
    return f"{_a(word)} {word}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class CorpusWriter:
    """Renders the passages of one world; `entity_passage[(type, index)]` is the position of its main passage."""

    def __init__(self, rng: random.Random, forge: NameForge, world: World) -> None:
        self.rng, self.forge, self.world = rng, forge, world
        self.passages: list[tuple[str, str]] = []
        self.entity_passage: dict[tuple[str, int], int] = {}
        self.kinds: dict[str, int] = defaultdict(int)
        # Academies, prizes, halls and markets recur across passages, as they do in a real encyclopedia.
        self.minor_names = [forge.word() for _ in range(max(40, len(world.persons) // 20))]

    def minor(self) -> str:
        """A name for something that is mentioned but has no passage of its own."""
        return self.minor_names[int(self.rng.random() * len(self.minor_names))]

    def add(self, kind: str, title: str, sentences: list[str], fillers: list[str], key: int = -1) -> None:
        """Append one passage: all `sentences`, then fillers in order until a drawn target length."""
        target = between(self.rng, 55, 100)
        turn = int(self.rng.random() * len(fillers))  # rotating is cheaper than shuffling and varies enough
        fillers = fillers[turn:] + fillers[:turn]
        words = sum(s.count(" ") + 1 for s in sentences)
        for filler in fillers:
            if words >= target:
                break
            n = filler.count(" ") + 1
            if words + n <= MAX_WORDS:
                sentences.append(filler)
                words += n
        if key >= 0:
            self.entity_passage[(kind, key)] = len(self.passages)
        self.passages.append((title, " ".join(sentences)))
        self.kinds[kind] += 1

    def entities(self) -> None:
        """One passage per country, city, organisation, film and person."""
        w = self.world
        for i in range(len(w.countries)):
            self._country(i)
        for i in range(len(w.cities)):
            self._city(i)
        for i in range(len(w.organisations)):
            self._organisation(i)
        for i in range(len(w.films)):
            self._film(i)
        for i in range(len(w.persons)):
            self._person(i)

    def distractors(self, total: int) -> None:
        """Add distractors up to `total` passages: careers, surname lists, disambiguation pages, then events."""
        budget = total - len(self.passages)
        if budget <= 0:
            return
        rng, w = self.rng, self.world
        careers = rng.sample(range(len(w.persons)), min(budget // 5, len(w.persons)))
        for i in careers:
            self._career(i)
        by_surname: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(w.persons):
            by_surname[p.surname].append(i)
        shared = [name for name, people in by_surname.items() if len(people) > 1]
        for name in shared[:budget // 4]:
            self._surname(name, by_surname[name])
        stems = self._stems()
        for stem in list(stems)[:budget // 8]:
            self._disambiguation(stem, stems[stem])
        while len(self.passages) < total:
            self._event()

    # Entity passages ------------------------------------------------------------------------------

    def _country(self, i: int) -> None:
        rng, w, k = self.rng, self.world, self.world.countries[i]
        capital = w.cities[k.capital].name
        others = [w.cities[c].name for c in k.cities if c != k.capital][:3]
        sentences = [f"{k.name}, officially the {k.formal}, is a country whose capital is {capital}."]
        fillers = [f"It became independent in {k.independence}.", f"Its currency is the {k.currency}."]
        if others:
            fillers.append(f"Other cities in {k.name} include {_listing(others)}.")
        fillers += [f"The country is divided into {between(rng, 4, 30)} provinces.",
                    f"Its highest mountain is Mount {self.minor()}, {_with_article(pick(rng, ADJECTIVES))} peak.",
                    f"{k.name} has a population of about {between(rng, 1, 90)} million people.",
                    f"The national archive in {capital} holds records going back to the {between(rng, 11, 17)}th century."]
        self.add("country", k.name, sentences, fillers, i)

    def _city(self, i: int) -> None:
        rng, w, c = self.rng, self.world, self.world.cities[i]
        country = w.countries[c.country]
        sentences = [pick(rng, (f"{c.name} is a city in {country.name}.",
                                 f"{c.name} is a city in {country.name}, on the {c.river} River.")),
                     f"It was founded in {c.founded}.",
                     f"The current mayor of {c.name} is {w.persons[c.mayor].name}."]
        if country.capital == i:
            sentences.append(f"{c.name} is the capital of {country.name}.")
        if "River" not in sentences[0]:
            sentences.append(f"The city lies on the {c.river} River.")
        fillers = [f"It has a population of about {c.population:,}.",
                   f"{c.name} hosts an annual {self.minor()} market each autumn.",
                   f"Its old town is known for {pick(rng, ADJECTIVES)} stone bridges and narrow streets.",
                   f"A railway line links {c.name} with {pick(rng, w.cities).name}.",
                   f"The local economy relies on {pick(rng, SUBJECTS)} research, tourism and light industry."]
        self.add("city", c.name, sentences, fillers, i)

    def _organisation(self, i: int) -> None:
        rng, w, o = self.rng, self.world, self.world.organisations[i]
        sentences = [f"{o.name} is {_a(o.industry)} {o.industry} organisation headquartered in "
                     f"{w.cities[o.headquarters].name}.",
                     f"It was founded in {o.founded} by {w.persons[o.founder].name}."]
        fillers = [f"It employs about {between(rng, 2, 900) * 10} people.",
                   f"{o.name} opened a regional office in {pick(rng, w.cities).name} in "
                   f"{between(rng, o.founded, LATEST_YEAR)}.",
                   f"Its best-known line of work is the {self.minor()} programme.",
                   f"The organisation publishes an annual report each {pick(rng, MONTHS)}.",
                   f"Observers describe its management style as {pick(rng, ADJECTIVES)}."]
        self.add("organisation", o.name, sentences, fillers, i)

    def _film(self, i: int) -> None:
        rng, w, f = self.rng, self.world, self.world.films[i]
        adjective = pick(rng, ADJECTIVES)
        sentences = [f"{f.title} is a {f.year} {f.genre} film directed by {w.persons[f.director].name}.",
                     pick(rng, (f"It stars {w.persons[f.lead].name} in the lead role.",
                                 f"{w.persons[f.lead].name} plays the lead role."))]
        fillers = [f"The film was shot on location in {pick(rng, w.cities).name}.",
                   f"It runs {between(rng, 80, 170)} minutes.",
                   f"Reviewers praised its {pick(rng, ADJECTIVES)} photography and its score.",
                   f"It premiered at the {pick(rng, w.cities).name} Film Festival.",
                   f"The screenplay draws on {_a(adjective)} {adjective} novel about {pick(rng, SUBJECTS)}."]
        self.add("film", f.title, sentences, fillers, i)

    def _person(self, i: int) -> None:
        rng, w, p = self.rng, self.world, self.world.persons[i]
        s, city, occ = p.surname, w.cities[p.birthplace].name, p.occupation
        org = w.organisations[p.employer].name
        sentences = [pick(rng, (f"{p.name} is {_a(occ)} {occ} born in {city} in {p.birth_year}.",
                                 f"{p.name} (born {p.birth_year} in {city}) is {_a(occ)} {occ}.",
                                 f"{p.name} is {_a(occ)} {occ}. {s} was born in {p.birth_year} in the city of {city}."))]
        if p.founded >= 0:
            sentences.append(f"In {w.organisations[p.founded].founded}, {s} founded {org}, and still works there.")
        else:
            sentences.append(pick(rng, (f"{s} works for {org}.", f"{s} is employed by {org}.")))
        if p.mayor_of >= 0:
            since = min(LATEST_YEAR, p.birth_year + between(rng, 30, 55))
            sentences.append(f"Since {since}, {s} has served as the mayor of {w.cities[p.mayor_of].name}.")
        if p.directed:
            films = [f"{w.films[f].title} ({w.films[f].year})" for f in p.directed[:4]]
            sentences.append(f"{s} directed {_listing(films)}.")
        if p.starred:
            films = [f"{w.films[f].title} ({w.films[f].year})" for f in p.starred[:4]]
            sentences.append(f"{s} played the lead role in {_listing(films)}.")
        later = min(LATEST_YEAR, p.birth_year + between(rng, 20, 60))
        fillers = [f"{s} studied {pick(rng, SUBJECTS)} at the {self.minor()} Academy.",
                   f"In {later}, {s} received the {self.minor()} Prize.",
                   f"Critics have described the work of {s} as {pick(rng, ADJECTIVES)} and {pick(rng, ADJECTIVES)}.",
                   f"{s} speaks three languages and spends part of each year in the countryside.",
                   f"A biography of {s} appeared in {min(LATEST_YEAR, later + between(rng, 1, 15))}.",
                   f"{s} is a member of the {self.minor()} Society and sits on the board of a local library.",
                   f"Friends describe {s} as {pick(rng, ADJECTIVES)}, with a lifelong interest in {pick(rng, SUBJECTS)}.",
                   f"{s} married in {min(LATEST_YEAR, p.birth_year + between(rng, 20, 40))} and has "
                   f"{pick(rng, ('one child', 'two children', 'three children', 'no children'))}."]
        self.add("person", p.name, sentences, fillers, i)

    # Distractor passages ----------------------------------------------------------------------------

    def _career(self, i: int) -> None:
        rng, w, p = self.rng, self.world, self.world.persons[i]
        s, org = p.surname, w.organisations[p.employer].name
        joined = "founding" if p.founded >= 0 else "joining"
        colleague = pick(rng, w.persons).name
        sentences = [f"Before {joined} {org}, {s} spent several years in {pick(rng, w.cities).name}, "
                     f"working on {pick(rng, ADJECTIVES)} projects with {colleague}.",
                     f"In {min(LATEST_YEAR, p.birth_year + between(rng, 20, 40))}, {s} moved to "
                     f"{pick(rng, w.cities).name}."]
        fillers = [f"{s} later taught {pick(rng, SUBJECTS)} at an academy in {pick(rng, w.cities).name}.",
                   f"Colleagues remember {s} as {pick(rng, ADJECTIVES)} and demanding.",
                   f"{s} has written essays on {pick(rng, SUBJECTS)} and on the history of "
                   f"{pick(rng, w.countries).name}.",
                   f"A collection of letters between {s} and {pick(rng, w.persons).name} was published in "
                   f"{min(LATEST_YEAR, p.birth_year + between(rng, 40, 70))}.",
                   f"The archive of {s} is kept in {pick(rng, w.cities).name}."]
        self.add("career", p.name, sentences, fillers)

    def _surname(self, surname: str, people: list[int]) -> None:
        w = self.world
        entries = [f"{w.persons[i].name} (born {w.persons[i].birth_year}), {_a(w.persons[i].occupation)} "
                   f"{w.persons[i].occupation} from {w.cities[w.persons[i].birthplace].name}"
                   for i in people[:6]]
        sentences = [f"{surname} is a surname. Notable people with the surname include {'; '.join(entries)}."]
        fillers = [f"The name is thought to derive from an old word for {_with_article(pick(self.rng, ADJECTIVES))} "
                   f"traveller or messenger.",
                   f"Variant spellings of {surname} appear in parish records from several regions.",
                   "Not all bearers of the name are related to one another."]
        self.add("surname", f"{surname} (surname)", sentences, fillers)

    def _stems(self) -> dict[str, list[str]]:
        """Name stems shared by two or more entities (a city, its "North" twin, a bank named after it)."""
        w = self.world
        uses: dict[str, list[str]] = defaultdict(list)
        for c in w.cities:
            country = w.countries[c.country].name
            uses[c.name.split(" ")[-1]].append(f"{c.name}, a city in {country}")
        for o in w.organisations:
            uses[o.base].append(f"{o.name}, {_a(o.industry)} {o.industry} organisation")
        for f in w.films:
            for word in f.title.split(" "):
                if word in uses:
                    uses[word].append(f"{f.title}, a {f.year} film directed by {w.persons[f.director].name}")
        return {stem: entries[:6] for stem, entries in uses.items() if len(entries) > 1}

    def _disambiguation(self, stem: str, entries: list[str]) -> None:
        sentences = [f"{stem} may refer to several places, organisations and works: {'; '.join(entries)}."]
        fillers = [f"The name {stem} is said to come from an old word for {_with_article(pick(self.rng, ADJECTIVES))} river crossing.",
                   "This page lists entities that share the same name.",
                   "If an internal link led you here, you may wish to change the link to point to the intended article.",
                   "Spellings of the name vary between older and newer maps of the region."]
        self.add("disambiguation", f"{stem} (disambiguation)", sentences, fillers)

    def _event(self) -> None:
        rng, w = self.rng, self.world
        city = pick(rng, w.cities)
        kind, description = pick(rng, EVENT_KINDS)
        year = between(rng, 1950, LATEST_YEAR)
        title = f"{year} {city.name} {kind}"
        while not self.forge.claim(title):
            year = between(rng, 1950, LATEST_YEAR)
            title = f"{year} {city.name} {self.minor()} {kind}"
        org = w.organisations[rng.randrange(len(w.organisations))]
        people = [w.persons[rng.randrange(len(w.persons))] for _ in range(3)]
        named = [f"{p.name} of {w.organisations[p.employer].name}" for p in people[:2]] + [people[2].name]
        sentences = [f"The {title} was {_a(description)} {description} held in {city.name}, "
                     f"{w.countries[city.country].name}, in {pick(rng, MONTHS)} {year}.",
                     f"It was organised by {org.name} and drew about {between(rng, 2, 400) * 100} visitors.",
                     f"Participants included {_listing(named)}."]
        fillers = [f"The next edition took place in {pick(rng, w.cities).name} in {year + between(rng, 1, 4)}.",
                   f"Local newspapers called the event {pick(rng, ADJECTIVES)} and well run.",
                   f"A closing ceremony was held at the {self.minor()} Hall.",
                   f"Tickets sold out {between(rng, 2, 9)} weeks in advance."]
        self.add("event", title, sentences, fillers)

    def render(self, num_passages: int) -> None:
        """Entity passages, then distractors up to `num_passages` in total (more if the entities alone exceed it)."""
        self.entities()
        self.distractors(num_passages)
