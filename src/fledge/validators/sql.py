"""SQL validator: sqlglot's parser in a chosen dialect, plus the checks sqlglot leaves out.

    v = get_validator("sql", dialect="postgres")
    v("SELECT name FROM users WHERE age > 30").ok     # True
    v("SELECT a FROM t GROUP").message                 # "... GROUP is a reserved word used as a name ..."

sqlglot is lenient by design: it reads `SELECT a FROM t GROUP` as a table aliased GROUP,
`hello world` as an aliased expression, `... GROUP BY` with nothing after it, trailing commas,
and statements it does not know as opaque commands. A model that stops mid-statement must
fail, so on top of sqlglot's errors (error level RAISE) a statement is rejected when:

- it is a bare expression, not a statement (`hello world`);
- sqlglot fell back to an opaque Command (`SHOW TABLES`, `EXPLAIN ...`): it cannot vouch for it;
- an unquoted word reserved in every major dialect (GROUP, ORDER, WHERE, ...) is used as a name;
- its last token needs something after it (`BY`, `AS`, `AND`, `=`, `,`, `(` ...);
- a comma is followed by FROM or `)`, except in dialects that allow trailing commas;
- UPDATE has no SET items, INSERT no VALUES or query, CREATE TABLE no columns, or IN () is empty.

It checks syntax only: unknown tables, columns or functions are the database's to report.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import types

from fledge.errors import FledgeError, RecipeError
from fledge.validators.extract import extract_candidate, statement_finder
from fledge.validators.verdict import Validator, Verdict, empty_verdict

STATEMENT_KEYWORDS = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "MERGE",
                      "REPLACE", "TRUNCATE", "GRANT", "REVOKE", "VALUES")
# Reserved (not usable as a bare name) in the SQL standard, PostgreSQL and MySQL; most in SQLite too.
RESERVED_WORDS = frozenset((
    "ALL", "ALTER", "AND", "AS", "BETWEEN", "BY", "CASE", "CREATE", "CROSS", "DELETE", "DISTINCT", "DROP", "ELSE",
    "EXCEPT", "EXISTS", "FROM", "GROUP", "HAVING", "IN", "INNER", "INSERT", "INTERSECT", "INTO", "IS", "JOIN", "LIKE",
    "LIMIT", "NATURAL", "NOT", "NULL", "ON", "OR", "ORDER", "SELECT", "SET", "TABLE", "THEN", "UNION", "UPDATE",
    "USING", "VALUES", "WHEN", "WHERE", "WITH",
))
# Token types (sqlglot names) that cannot end a statement: something must follow them.
DANGLING_TOKENS = ("COMMA", "DOT", "AND", "OR", "NOT", "ALIAS", "GROUP_BY", "ORDER_BY", "PARTITION_BY", "WHERE",
                   "FROM", "SELECT", "JOIN", "ON", "HAVING", "LIMIT", "OFFSET", "IN", "IS", "LIKE", "ILIKE",
                   "BETWEEN", "CASE", "WHEN", "THEN", "ELSE", "SET", "VALUES", "INTO", "UNION", "EXCEPT",
                   "INTERSECT", "DISTINCT", "WITH", "EQ", "NEQ", "GT", "GTE", "LT", "LTE", "PLUS", "DASH",
                   "SLASH", "MOD", "L_PAREN", "L_BRACKET", "DPIPE", "USING", "INSERT", "UPDATE", "DELETE")
TRAILING_COMMA_DIALECTS = frozenset({"bigquery", "duckdb", "snowflake"})
FENCE_TAGS = ("sql", "postgresql", "postgres", "psql", "mysql", "sqlite", "tsql", "plsql")


def make_sql_validator(*, dialect: str = "", extract: bool = True) -> Validator:
    """Validate SQL with sqlglot. dialect: sqlglot's name ("postgres", "mysql", "sqlite", ...; "" generic)."""
    dialect = _check_dialect(dialect)
    tags = FENCE_TAGS + ((dialect,) if dialect else ())
    find = statement_finder(STATEMENT_KEYWORDS, quotes="'\"`", line_comments=("--",))
    return Validator(
        name="sql",
        judge=functools.partial(judge_sql, dialect=dialect),
        extract=(lambda text: extract_candidate(text, tags, find)) if extract else str.strip,
    )


def judge_sql(candidate: str, dialect: str = "") -> Verdict:
    """Parse one SQL candidate (one or more statements); the message says what is wrong and where."""
    if not candidate.strip():
        return empty_verdict("SQL statement")
    try:
        error = sql_syntax_error(candidate, dialect)
    except RecursionError:  # sqlglot's parser recurses per nesting level
        return Verdict(None, candidate, "nested too deeply for sqlglot (Python's recursion limit); cannot judge")
    return Verdict(error is None, candidate, error or "")


def sql_syntax_error(sql: str, dialect: str = "") -> str | None:
    """None if every statement in `sql` parses strictly, else what is wrong with the first bad one."""
    sg = _sqlglot()
    try:
        tokens = sg.sqlglot.tokenize(sql, read=dialect or None)
        with _quiet_sqlglot():
            statements = sg.sqlglot.parse(sql, read=dialect or None, error_level=sg.ErrorLevel.RAISE)
    except (sg.errors.ParseError, sg.errors.TokenError) as error:
        return str(error).split("\n")[0]
    for statement in statements:
        if statement is None:
            continue  # an empty statement between two ';'
        problem = _statement_problem(statement, sg.exp)
        if problem:
            return problem
    return _token_problem(tokens, sg.TokenType, dialect)


def _statement_problem(statement, exp) -> str | None:
    if isinstance(statement, exp.Command):
        return (f"sqlglot cannot parse this kind of statement ({str(statement.this).upper()} ...), "
                "so it cannot be confirmed as valid SQL")
    if not _is_statement(statement, exp):
        return f"{statement.sql()!r} is an expression, not a SQL statement"
    if isinstance(statement, exp.Update) and not statement.expressions:
        return "UPDATE without SET assignments"
    if isinstance(statement, exp.Insert) and statement.expression is None and not statement.args.get("default"):
        return "INSERT without VALUES or a query"
    if (isinstance(statement, exp.Create) and statement.kind == "TABLE" and statement.expression is None
            and not isinstance(statement.this, exp.Schema) and not statement.args.get("properties")):
        return "CREATE TABLE without columns or AS query"
    for node in statement.find_all(exp.In):
        if not node.expressions and not any(node.args.get(k) for k in ("query", "unnest", "field")):
            return f"an empty IN () list in {node.sql()!r}"
    for identifier in statement.find_all(exp.Identifier):
        if not identifier.quoted and identifier.name.upper() in RESERVED_WORDS:
            return (f"{identifier.name} is a reserved word used as a name (an alias, table or column); "
                    "the statement looks truncated. Quote it if a name is meant")
    return None


def _is_statement(node, exp) -> bool:
    kinds = tuple(getattr(exp, name) for name in (
        "Query", "DML", "DDL", "Drop", "Alter", "Merge", "Set", "Use", "Transaction", "Commit", "Rollback",
        "Describe", "Grant", "Revoke", "Pragma", "Copy", "Analyze", "Cache", "Uncache", "Refresh", "Declare",
        "Kill", "Summarize", "Show", "TruncateTable", "LoadData", "Execute", "Values",
    ) if hasattr(exp, name))
    return isinstance(node, kinds)


def _token_problem(tokens, token_type, dialect: str) -> str | None:
    dangling = {getattr(token_type, name) for name in DANGLING_TOKENS if hasattr(token_type, name)}
    statements, current = [], []
    for token in tokens:
        if token.token_type == token_type.SEMICOLON:
            statements.append(current)
            current = []
        else:
            current.append(token)
    statements.append(current)
    for statement in statements:
        if statement and statement[-1].token_type in dangling:
            last = statement[-1]
            return f"line {last.line}:{last.col}: the statement ends with {last.text!r}; it looks truncated"
        if dialect in TRAILING_COMMA_DIALECTS:
            continue
        for comma, after in zip(statement, statement[1:], strict=False):
            if comma.token_type == token_type.COMMA and after.token_type in (token_type.FROM, token_type.R_PAREN):
                return f"line {comma.line}:{comma.col}: a trailing comma before {after.text!r}"
    return None


def _check_dialect(dialect: str) -> str:
    _sqlglot()
    from sqlglot.dialects.dialect import Dialects

    known = [d.value for d in Dialects if d.value]
    dialect = (dialect or "").lower()
    if dialect and dialect not in known:
        close = difflib.get_close_matches(dialect, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"sql validator: unknown dialect {dialect!r}{hint} sqlglot knows: {', '.join(known)}")
    return dialect


@contextlib.contextmanager
def _quiet_sqlglot():
    """sqlglot logs a warning for every statement it falls back on; the verdict says it instead."""
    logger = logging.getLogger("sqlglot")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@functools.cache
def _sqlglot():
    """Import sqlglot on first use (about 0.1 s)."""
    try:
        import sqlglot
    except ImportError as error:
        raise FledgeError(f"the sql validator needs sqlglot ({error}). "
                          "Install it: pip install 'sqlglot>=30'") from error
    from sqlglot import ErrorLevel, errors, exp
    from sqlglot.tokens import TokenType

    return types.SimpleNamespace(sqlglot=sqlglot, exp=exp, TokenType=TokenType, ErrorLevel=ErrorLevel, errors=errors)
