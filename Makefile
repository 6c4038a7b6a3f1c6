# Two commands do all the set-up on a fresh machine (Python 3.11, no internet but PyPI):
#   make run    install into .venv, load the demo corpus, serve on http://127.0.0.1:5100
#   make test   install into .venv (with test tools), run the whole test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-prod.txt setup.py campus_search_gunicorn_keepalive.pth 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: install run test lint bench clean docs system-tools rehearse

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	# runtime packages at the versions production pins (requirements-prod.txt), test tools from the extra
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements-prod.txt -e '.[test]'
	# an editable install leaves out the wheel's start-up hook that accepts the brief's --keepalive (setup.py)
	cp campus_search_gunicorn_keepalive.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# make run keeps its data with the checkout (.data/, git-ignored) unless DATA_DIR says otherwise, so two
# checkouts on one machine never share a database; the banner's "Data dir" line says where it is.
RUN_DATA_DIR := $(if $(DATA_DIR),$(DATA_DIR),$(CURDIR)/.data)

run: install
	@echo "make run: data in $(RUN_DATA_DIR)"
	DATA_DIR="$(RUN_DATA_DIR)" $(VENV)/bin/campus-search serve --demo

# Programs of the production stack that some tests use when present: a real pgbouncer in transaction mode
# (tests/test_pgbouncer.py), `nginx -t` on nginx/nginx.conf, and the shortened rehearsal of the whole
# stack (tests/test_rehearsal.py: pgbouncer, nginx, redis-server, prometheus + promtool, openssl). Best
# effort: only as root with apt; otherwise those tests skip and say why.
STACK_PROGRAMS := pgbouncer nginx redis-server prometheus promtool openssl
system-tools:
	@missing=""; for p in $(STACK_PROGRAMS); do command -v $$p >/dev/null || [ -x /usr/sbin/$$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        pgbouncer nginx redis-server prometheus openssl) >/dev/null 2>&1; } \
	  || echo "note:$$missing not installed; tests/test_pgbouncer.py, nginx -t and tests/test_rehearsal.py will skip"; \
	fi

# Lint first (ruff, mypy: pinned versions), then the suite. pytest exits 5 when it collects nothing;
# that is not a failure of the code under test.
test: install system-tools
	$(VENV)/bin/ruff check campus_search tests bench deploy production_system.py
	$(VENV)/bin/mypy campus_search production_system.py bench
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

lint: install
	$(VENV)/bin/ruff check campus_search tests bench deploy production_system.py
	$(VENV)/bin/mypy campus_search production_system.py bench

# The whole production topology on this machine (127.0.0.1, free ports, a private directory), broken on
# purpose under load; prints one table and one JSON line (docs/deployment.md, "Rehearsal").
rehearse: install system-tools
	$(PY) deploy/rehearse $(REHEARSE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# Regenerate the configuration table in docs/configuration.md from the declarations in campus_search/config/settings.py (a test checks it).
docs: install
	$(PY) -c "import pathlib, campus_search.config as c; p = pathlib.Path('docs/configuration.md'); t = p.read_text(); p.write_text(t[:t.index('| variable |')] + c.markdown_table())"
