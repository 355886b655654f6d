"""Cypher validator: a real Cypher parser (cypherast, from PyPI), not bracket counting.

    v = get_validator("cypher")
    v("MATCH (p:Person) WHERE EXISTS { (p)-[:KNOWS]->() } RETURN p").ok   # True
    v("MATCH (p:Person RETURN p").message   # "line 1:16 mismatched input 'RETURN' expecting ')'"

The parser is cypherast's hand-written recursive-descent parser (`pip install cypherast`, MIT),
run with Neo4j 5's feature set: EXISTS { }, COUNT { } and CALL { } subqueries (with CALL (x) { },
OPTIONAL CALL and IN TRANSACTIONS), IS NOT NULL, list and pattern comprehensions, map
projections, label expressions, quantified path patterns and LOAD CSV. A subclass of its parser
fixes what Neo4j 5 accepts and cypherast 0.1 refuses: COLLECT { } and CALL () { } subqueries; a
pattern as a function argument, count(DISTINCT (m)-->(g)); `RETURN (n) AS x`; label negation
(n:!Temp); procedure names holding keywords (db.index.fulltext.queryNodes). It also refuses what
cypherast 0.1 lets through: a ')' too many after a pattern predicate, a lone '-' as a
relationship, `()` as a value, and tokens that are no names (`AS 3`, `n.'x'`, `(n:})`).

Around the parser, fledge's own rules: statements are split at ';'; an EXPLAIN or PROFILE prefix
is allowed; only count takes '*' (cypherast reads ocunt(*) as ocunt()); IN TRANSACTIONS OF n
needs ROWS; REMOVE takes properties or labels; and two checks Neo4j reports as errors: a query
(also a CALL { } body) must conclude with RETURN, FINISH, an update clause or a CALL, since a
query cut off after MATCH or WITH parses but Neo4j refuses it, and a variable must be bound. A
pattern used as a predicate, WHERE (a)-->(b), binds nothing (Neo4j refuses new variables there);
otherwise binding is checked without scopes, so a variable bound anywhere in the statement
counts: lenient by design.

On the 400 real queries Neo4j 5 ran (shared/data/cypher) it accepts 399; the one it rejects uses
`size{...}`, which is no Cypher syntax (see tests/unit/test_validators.py). It checks syntax
only: unknown labels, functions or type errors are Neo4j's to report. Not parsed, so refused:
type predicates (`x IS :: INTEGER`), `n IS Label`, and a parenthesized path without a quantifier.
Admin commands (SHOW ..., CREATE INDEX / CONSTRAINT ...) are passed over unparsed by cypherast,
so their verdict is None (cannot judge). Importing cypherast takes about 0.05 s, once, on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

from fledge.errors import FledgeError
from fledge.validators.extract import extract_candidate, statement_finder
from fledge.validators.verdict import Validator, Verdict, empty_verdict

CLAUSE_KEYWORDS = ("MATCH", "OPTIONAL", "CREATE", "MERGE", "WITH", "CALL", "RETURN", "UNWIND", "USE", "LOAD",
                   "FOREACH", "EXPLAIN", "PROFILE", "SHOW")
FENCE_TAGS = ("cypher", "neo4j", "cql", "opencypher")
_find_statement = statement_finder(CLAUSE_KEYWORDS, quotes="'\"`", line_comments=("//",))
_DIALECT = "fledge-neo4j5"
_ENDINGS = "it must end with RETURN, FINISH, an update clause or a CALL"
# How cypherast names expected tokens, as the user writes them.
_SPELLING = {"RPAREN": "')'", "LPAREN": "'('", "RBRACKET": "']'", "LBRACKET": "'['", "RBRACE": "'}'",
             "LBRACE": "'{'", "COMMA": "','", "DOT": "'.'", "COLON": "':'", "EQ": "'='", "PIPE": "'|'",
             "MINUS": "'-'", "ARROW_RIGHT": "'->'", "ARROW_LEFT": "'<-'", "EOF": "end of input", "IDENT": "a name",
             "NULL_KW": "NULL"}
_ERROR_HEAD = re.compile(r"^\[CG\d+\] (?:line \d+:\d+ )?")


def make_cypher_validator(*, extract: bool = True) -> Validator:
    """Validate Cypher as Neo4j 5 accepts it. extract: find the query in a chatty answer."""
    _cypherast()  # fail now, not on the first text, if cypherast is missing
    return Validator(
        name="cypher",
        judge=judge_cypher,
        extract=_extract if extract else str.strip,
    )


def _extract(text: str) -> str:
    return extract_candidate(text, FENCE_TAGS, _find_statement)


def judge_cypher(candidate: str) -> Verdict:
    """Parse one Cypher candidate; the message is the first error, located as `line L:C`."""
    if not candidate.strip():
        return empty_verdict("Cypher query")
    ok, message = check_cypher(candidate)
    return Verdict(ok, candidate, message)


def check_cypher(text: str) -> tuple[bool | None, str]:
    """(True, "") for Cypher that Neo4j 5 accepts, else (False, the first error), or (None, why)
    when it cannot judge: an admin command, or nesting deeper than the parser goes."""
    cy = _cypherast()
    try:
        tokens = cy.Lexer(text).tokenize()
    except cy.Error as error:
        return False, _describe(error, text, [])
    cannot_judge = ""
    for statement in _statements(tokens, cy):
        if isinstance(statement, str):
            return False, statement
        parser = cy.Parser(text, statement)
        try:
            tree = parser.parse()
        except cy.Error as error:
            if error.code == "CG1105":
                return None, "nested too deeply for the parser (Python's recursion limit); cannot judge"
            return False, _describe(error, text, statement)
        if any(isinstance(node, cy.ast.AdminStatement) for node in _nodes(tree, cy)):
            cannot_judge = ("admin commands (SHOW ..., CREATE INDEX / CONSTRAINT ...) are not parsed by "
                            "the Cypher parser; cannot judge")
            continue
        error = (_token_error(statement, text, cy) or _clause_error(tree, parser, cy)
                 or _conclusion_error(tree, parser, cy) or _unbound_error(tree, text, statement, cy))
        if error:
            return False, error
    return (None, cannot_judge) if cannot_judge else (True, "")


def _statements(tokens: list, cy) -> list:
    """The token list (ending in EOF) of each ';'-separated statement, EXPLAIN / PROFILE
    dropped; an error message instead of a statement that is empty."""
    parts, current = [], []
    for token in tokens:
        if token.kind in (cy.TokenKind.SEMICOLON, cy.TokenKind.EOF):
            parts.append((current, token))
            current = []
        else:
            current.append(token)
    statements = []
    for index, (body, end) in enumerate(parts):
        if body and body[0].kind is cy.TokenKind.IDENT and body[0].text.upper() in ("EXPLAIN", "PROFILE"):
            prefix, body = body[0], body[1:]
            if not body:
                statements.append(f"{_where(end)} {prefix.text.upper()} needs a query after it")
                continue
        if body:
            statements.append(body + [cy.Token(cy.TokenKind.EOF, "", end.position)])
        elif index == len(parts) - 1 and index > 0:
            continue  # after a final ';'
        elif end.kind is cy.TokenKind.EOF:
            statements.append(f"{_where(end)} no Cypher statement found (only comments?)")
        else:
            statements.append(f"{_where(end)} empty statement before ';'")
    return statements


def _where(token) -> str:
    """ANTLR's and Neo4j's location style: 1-based line, 0-based column."""
    return f"line {token.position.line}:{token.position.col - 1}"


def _describe(error, text: str, tokens: list) -> str:
    """cypherast's error as `line L:C message expecting ...`."""
    message = _ERROR_HEAD.sub("", str(error).split("\n", 1)[0]).split("; expected {")[0]
    message = message.replace("input ''", "end of input").replace("token ''", "end of input")
    message = message[:1].lower() + message[1:]
    if error.code == "CG1103":  # the one message without the token that caused it
        found = [_spelled(t, text) for t in tokens if error.position and t.position.offset == error.position.offset]
        message += " (MATCH, CREATE, MERGE, WITH, UNWIND, CALL, RETURN, ...)" + (f", got {found[0]!r}" if found else "")
    if error.expected:
        message += " expecting " + " or ".join(sorted(_SPELLING.get(e, e) for e in error.expected))
    where = f"line {error.position.line}:{error.position.col - 1} " if error.position else ""
    return where + message


def _spelled(token, text: str) -> str:
    """A token as written: cypherast upper-cases keywords and unquotes `names`."""
    if token.kind.name in ("IDENT", "STRING"):
        return token.text
    if token.kind.name == "PARAMETER":
        return "$" + token.text
    return text[token.position.offset:token.position.offset + len(token.text)]


def _token_error(statement: list, text: str, cy) -> str | None:
    """Two rules cypherast does not keep: only count takes '*' (it reads ocunt(*) or
    count(DISTINCT *) as a call without arguments), and IN TRANSACTIONS OF n needs ROWS."""
    kind = cy.TokenKind
    for i, token in enumerate(statement):
        if token.kind is kind.STAR:
            distinct = i > 0 and statement[i - 1].kind is kind.DISTINCT
            opening = i - 1 - distinct
            if opening < 1 or statement[opening].kind is not kind.LPAREN:
                continue
            function = statement[opening - 1]
            named = function.kind in (kind.IDENT, kind.COUNT, kind.COLLECT)
            if named and (distinct or function.kind is not kind.COUNT):
                written = f"{_spelled(function, text)}({'DISTINCT ' if distinct else ''}*)"
                return f"{_where(token)} mismatched input '*': only count(*) takes '*', not {written}"
        elif _is_word(token, "OF", cy) and i > 0 and _is_word(statement[i - 1], "TRANSACTIONS", cy) and not any(
                _is_word(later, "ROWS", cy) or _is_word(later, "ROW", cy) for later in statement[i + 1:]):
            return f"{_where(statement[-1])} missing ROWS: write IN TRANSACTIONS OF <number> ROWS"
    return None


def _is_word(token, word: str, cy) -> bool:
    return token.kind is cy.TokenKind.IDENT and token.text.upper() == word


def _clause_error(tree, parser, cy) -> str | None:
    """What cypherast parses but Neo4j refuses: REMOVE of a whole variable, and a lone node with
    labels and properties as a predicate, WHERE (n:Post {id: 1}), which is neither a pattern
    (no relationship) nor an expression."""
    a = cy.ast
    for node in _nodes(tree, cy):
        if isinstance(node, a.Remove):
            for item in node.items:
                if not isinstance(item, (a.Property, a.RemoveLabels, a.ListSubscript)):
                    token = parser.clause_tokens.get(id(node), parser.tokens[0])
                    return f"{_where(token)} REMOVE takes properties (n.name) or labels (n:Label), not a whole variable"
        elif isinstance(node, a.PatternPredicate) and isinstance(node.pattern, a.PathPattern):
            elements = node.pattern.elements
            if len(elements) == 1 and getattr(elements[0], "labels", None) and getattr(elements[0], "properties", None):
                return "a pattern used as a predicate needs a relationship: (n:Label {...}) alone is not an expression"
    return None


def _conclusion_error(tree, parser, cy) -> str | None:
    """The first query, at the top or in a CALL { } or COLLECT { } body, that ends on a reading clause."""
    a = cy.ast
    concluding = (a.Return, a.Create, a.Merge, a.Set, a.Delete, a.Remove, a.Foreach, a.CallSubquery,
                  a.CallProcedure, a.Insert)
    bodies = [(tree.this, concluding, _ENDINGS)]
    for node in _nodes(tree, cy):
        if isinstance(node, a.CallSubquery):
            bodies.append((node.query, concluding, _ENDINGS))
        elif isinstance(node, cy.CollectSubquery):
            bodies.append((node.query, (a.Return,), "a COLLECT { } subquery must end with RETURN"))
    for body, allowed, rule in bodies:
        queries = [body] if isinstance(body, a.Query) else _union_parts(body, cy)
        for query in queries:
            last = query.clauses[-1]
            if isinstance(last, allowed) or id(query) in parser.finished:
                continue
            keyword = ("OPTIONAL MATCH" if getattr(last, "optional", None) else
                       {"LoadCsv": "LOAD CSV"}.get(type(last).__name__, type(last).__name__.upper()))
            token = parser.clause_tokens.get(id(last), parser.tokens[0])
            return f"{_where(token)} query cannot conclude with {keyword} ({rule}); it looks truncated"
    return None


def _union_parts(node, cy) -> list:
    parts, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, cy.ast.Union):
            stack += [item.expression, item.this]
        elif isinstance(item, cy.ast.Query):
            parts.append(item)
    return parts


def _unbound_error(tree, text: str, statement: list, cy) -> str | None:
    """The first variable read in the statement but bound nowhere in it."""
    reads, bound = _variables(tree, cy)
    unbound = {name for name in reads if name not in bound}
    if not unbound:
        return None
    kind = cy.TokenKind
    for before, token, after in zip(statement, statement[1:], statement[2:]):  # statement[0] binds or is a keyword
        name = _spelled(token, text)
        if (name in unbound and token.kind not in (kind.STRING, kind.PARAMETER)  # the variable, not n.name,
                and before.kind not in (kind.DOT, kind.COLON) and after.kind is not kind.COLON):  # :name or {name: }
            return f"{_where(token)} variable `{name}` is not defined"
    return f"variable `{sorted(unbound)[0]}` is not defined"


def _variables(tree, cy) -> tuple[list[str], set[str]]:
    """Names read, and names bound anywhere, in `tree`: patterns, AS, UNWIND, FOREACH, YIELD,
    LOAD CSV and comprehension variables bind; every other identifier reads."""
    a = cy.ast
    binding = {a.NodePattern: "variable", a.RelationshipPattern: "variable", a.PathPattern: "variable",
               a.Alias: "alias", a.Unwind: "alias", a.Foreach: "variable", a.ListComprehension: "variable",
               a.Quantifier: "variable", a.PatternComprehension: "variable", a.LoadCsv: "alias"}
    reads, bound = [], set()
    stack = [(tree, False)]  # a stack, not recursion: deeply nested expressions make deep trees
    while stack:
        node, in_predicate = stack.pop()
        if isinstance(node, (list, tuple)):
            stack += [(item, in_predicate) for item in node]
        elif isinstance(node, a.Identifier):
            reads.append(node.this)
        elif isinstance(node, a.Yield):  # YIELD column [AS name]: binds, and reads no variable
            bound.update(item.this if isinstance(item, a.Identifier) else item.alias.this
                         for item in node.expressions if isinstance(item, (a.Identifier, a.Alias)))
        elif isinstance(node, a.ListLambda):  # reduce(total = 0, x IN list | ...)
            bound.update(v.this for v in (node.variable, node.accumulator) if isinstance(v, a.Identifier))
            stack += [(node.source, in_predicate), (node.initial, in_predicate), (node.expression, in_predicate)]
        elif isinstance(node, a.SetItem) and isinstance(node.this, a.NodePattern):  # SET n:Label reads n
            reads.append(node.this.variable.this)
        elif isinstance(node, a.MapProjection):  # n {.name, x}: a bare x reads variable x
            reads += [entry for entry in node.entries if isinstance(entry, str)]
            stack += [(node.this, in_predicate)] + [(e, in_predicate) for e in node.entries if not isinstance(e, str)]
        elif isinstance(node, a.AstNode) and not isinstance(node, a.Use):  # USE names a graph
            # A pattern used as a predicate, WHERE (a)-->(b), cannot introduce variables (Neo4j
            # says so); EXISTS { }, COUNT { } and pattern comprehensions can.
            if isinstance(node, a.PatternPredicate) and not isinstance(node.pattern, a.Query):
                in_predicate = True
            elif isinstance(node, (a.Query, a.CountSubquery, a.PatternComprehension)):
                in_predicate = False
            field = binding.get(type(node))
            for name, value in node.args.items():
                if name == field and isinstance(value, a.Identifier):
                    if in_predicate and field == "variable":
                        reads.append(value.this)
                    else:
                        bound.add(value.this)
                else:
                    stack.append((value, in_predicate))
    return reads, bound


def _nodes(tree, cy):
    """Every AST node under `tree`, also inside the tuples cypherast keeps map entries in."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack += node
        elif isinstance(node, cy.ast.AstNode):
            yield node
            stack += node.args.values()


@functools.cache
def _cypherast() -> types.SimpleNamespace:
    """Import cypherast once (about 0.05 s) and build fledge's parser on it."""
    try:
        from cypherast import ast
        from cypherast.dialects import register
        from cypherast.dialects.neo4j import Neo4jCypher5
        from cypherast.errors import CypherastError
        from cypherast.lexer import Lexer, Token, TokenKind
        from cypherast.parser import Parser
    except ImportError as error:
        raise FledgeError(f"the cypher validator needs the cypherast parser ({error}). "
                          "Install it: pip install 'cypherast>=0.1.12,<0.2' (it needs Python 3.11+)") from error

    class FledgeNeo4j5(Neo4jCypher5):
        """Neo4j 5 as of 5.26 LTS: cypherast's Cypher 5 features plus CALL { } IN TRANSACTIONS
        (Neo4j 4.4+) and OPTIONAL CALL (5.24+); admin commands are recognised, then not judged."""

        name = _DIALECT
        aliases = ()
        capabilities = dataclasses.replace(Neo4jCypher5.capabilities, allow_call_in_transactions=True,
                                           allow_optional_call=True, allow_admin_ddl=True)

    register(FledgeNeo4j5)
    collect = type("CollectSubquery", (ast.AstNode,), {"arg_types": {"query": True},
                                                       "__doc__": "COLLECT { query }: a list of its rows."})
    return types.SimpleNamespace(ast=ast, Lexer=Lexer, Token=Token, TokenKind=TokenKind, Error=CypherastError,
                                 CollectSubquery=collect, Parser=_define_parser(Parser, ast, TokenKind, collect))


def _define_parser(base: type, ast, kind, collect_subquery: type) -> type:
    """cypherast's parser with the fixes listed in the module docstring. Defined here, not at
    module level, because its base class is imported lazily. It overrides cypherast 0.1's own
    methods, so cypherast is pinned below 0.2; the tests cover each fix."""

    class Neo4j5Parser(base):
        def __init__(self, source: str, tokens: list):
            super().__init__("", dialect=_DIALECT)
            self.source, self.tokens = source, tokens  # one statement's tokens, lexed once for all
            self.finished: set[int] = set()  # id() of each query that ends with FINISH
            self.clause_tokens: dict[int, object] = {}  # id() of a reading clause -> its first token

        def parse_query(self):
            query = super().parse_query()  # cypherast skips FINISH without a trace in the tree
            if self._peek(-1).kind is kind.FINISH and self._peek(-2).kind not in (kind.AS, kind.DOT, kind.COLON):
                self.finished.add(id(query))
            return query

        def _located(self, parse):
            first = self._peek()
            clause = parse()
            self.clause_tokens[id(clause)] = first
            return clause

        def parse_match(self):
            return self._located(super().parse_match)

        def parse_with(self):
            return self._located(super().parse_with)

        def parse_unwind(self):
            return self._located(super().parse_unwind)

        def parse_load_csv(self):
            return self._located(super().parse_load_csv)

        def parse_remove(self):
            return self._located(super().parse_remove)

        def parse_primary(self):
            if self._check(kind.COLLECT) and self._peek(1).kind is kind.LBRACE:
                self._advance()
                self._advance()
                query = self.parse_statement()
                self._expect(kind.RBRACE)
                return collect_subquery(query=query)
            return super().parse_primary()

        def parse_relationship_pattern(self):
            start = self._i
            relationship = super().parse_relationship_pattern()
            if self._i - start == 1:  # a lone '-': cypherast takes the second '-' of '--' as optional
                raise self._err(f"mismatched input {self._peek().text!r}", code="CG1102",
                                expected={"MINUS", "ARROW_RIGHT"})
            return relationship

        def _parse_label_expr_text(self) -> str:
            """A label expression after ':' that starts with '!' or '(' (cypherast stops after a '!')."""
            parts = []
            while True:
                while self._match(kind.BANG):
                    parts.append("!")
                if self._match(kind.LPAREN):
                    parts.append(f"({self._parse_label_expr_text()})")
                    self._expect(kind.RPAREN)
                elif self._match(kind.PERCENT):
                    parts.append("%")
                else:
                    parts.append(self._parse_unquoted_name())
                if not (self._check(kind.AMP) or self._check(kind.PIPE)):
                    return "".join(parts)
                parts.append(self._advance().text)

        def _parse_paren_or_pattern(self):
            if (self._peek(1).kind is kind.IDENT and self._peek(2).kind is kind.RPAREN
                    and self._peek(3).kind not in (kind.MINUS, kind.ARROW_LEFT, kind.ARROW_RIGHT)):
                self._advance()  # `(n)`, a variable in parentheses: cypherast loses its place after one
                variable = self.parse_variable()
                self._advance()
                return variable
            start = self._i
            node = super()._parse_paren_or_pattern()
            depth = sum((t.kind is kind.LPAREN) - (t.kind is kind.RPAREN) for t in self.tokens[start:self._i])
            if depth < 0:  # it took a ')' that closes the enclosing call or group
                if not isinstance(node, ast.PatternPredicate):  # a lone node such as `()`, which is no value
                    self._i = start + 1
                    raise self._err(f"mismatched input {self._peek().text!r}", code="CG1102")
                self._i -= 1  # give it back
            return node

        def _parse_call_subquery_body(self, *, optional=None):
            if self._check(kind.LPAREN) and self._peek(1).kind is kind.RPAREN:
                self._advance()  # CALL () { }, Neo4j 5.23's way to import nothing; cypherast wants a name
                self._advance()
            return super()._parse_call_subquery_body(optional=optional)

        def _parse_procedure_name(self) -> str:
            parts = [self._procedure_name_part()]
            while self._match(kind.DOT):
                parts.append(self._procedure_name_part())
            return ".".join(parts)

        def _procedure_name_part(self) -> str:
            self._require_name()
            return self._name_from_token(self._advance())

        # cypherast takes almost any token as a name (`AS 3`, `n.'x'`, `(n:})`): only words are names.
        def parse_variable(self):
            self._require_name()
            return super().parse_variable()

        def _parse_unquoted_name(self) -> str:
            self._require_name()
            return super()._parse_unquoted_name()

        def _parse_type_name(self) -> str:
            self._require_name()
            return super()._parse_type_name()

        def _require_name(self) -> None:
            token = self._peek()
            if token.kind is not kind.IDENT and (not token.text.isidentifier() or token.kind in (kind.STRING,
                                                                                                kind.PARAMETER)):
                raise self._err(f"mismatched input {token.text!r}", code="CG1102", expected={"IDENT"})

    return Neo4j5Parser
