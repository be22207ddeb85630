-- Runs once, when the postgres service starts on an empty data volume. The "mlflow" database
-- comes from POSTGRES_DB, and this adds the one for Optuna studies
-- (search.study_storage: postgresql://USER@postgres:5432/optuna, password from PGPASSWORD).
CREATE DATABASE optuna;
