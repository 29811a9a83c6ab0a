"""Helpers shared by the tests, imported as `support.<module>` (tests/ is on sys.path: conftest.py lives there).

paths         the repository root and the venv's console script
net           free_port: one free loopback port
tiny          the tiny random Llama (real SmolLM2 tokenizer) and grid documents on it
judge_server  ScriptedServer, the one fake OpenAI-compatible judge, and FaultJudge, its scripted faults
llama_server  llama-cpp-python's OpenAI-compatible server on loopback
ui            the Dagster webserver on loopback, its GraphQL API, Chromium
db            read-only inspection of a results database (ro_query, count, rows, table_dump, files_containing)
children      child processes the tests kill or run side by side (spawn, kill, children, wait_for, result_of)
child         the child-process script those children run (`python tests/support/child.py <command> <json>`)
sql_shell     a user's open `em-assets sql` shell fed queries from a thread
organisms     the fault grid (3 training steps, 8 completions) and the stage contexts and resources on it
workspace     pytest fixtures (a plugin of conftest.py): per-test copies of a catalogued or sampled database
"""
