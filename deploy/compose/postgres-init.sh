#!/bin/sh
# One Clearhouse database on its own PostgreSQL server, as clearhouse/provision.py makes it
# for `clearhouse up`: an owner role that runs the migrations and owns every table, and an
# app role the service runs as, which receives only what each migration grants it.
#
# The postgres image runs this once, as the superuser, when the data directory is new.
# Names and passwords come from the container's environment (docker-compose.yml):
#   CLEARHOUSE_DB, CLEARHOUSE_OWNER_PASSWORD, CLEARHOUSE_APP_PASSWORD
set -e

psql --username "$POSTGRES_USER" --dbname postgres --set ON_ERROR_STOP=1 \
     --set db="$CLEARHOUSE_DB" --set owner="${CLEARHOUSE_DB}_owner" --set app="${CLEARHOUSE_DB}_app" \
     --set owner_password="$CLEARHOUSE_OWNER_PASSWORD" --set app_password="$CLEARHOUSE_APP_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"db" OWNER :"owner";

-- The app role may connect to its own database and nowhere else: PUBLIC loses the
-- default CONNECT on every database of this server, the app role gets it back on one.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
REVOKE CONNECT ON DATABASE postgres, template1 FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"app";

-- Inside the database: the app role may look up objects in public; table privileges
-- come from the migrations (shared/migrate.py), sequences by default as the owner creates them.
\connect :"db"
GRANT USAGE ON SCHEMA public TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO :"app";
SQL
