// PostgreSQL JDBC (Debian's libpostgresql-jdbc-java) through pgwarden in
// transaction pooling, compiled with javac by tests/it/drivers.rs.
//
// prepareThreshold=1 makes pgjdbc switch a PreparedStatement to a named
// server-side statement from its first execution, so every reuse below is a
// Bind/Execute of a named statement that must survive the client moving
// between server connections. Covers: identity, a PreparedStatement reused
// many times, batch inserts, commit / rollback / savepoint, an error inside
// a transaction, reading through a portal (fetchSize), and several threads
// with their own connections (more than the gateway's pool) mixing two
// identities. Exits non-zero on the first failure.
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE,
// PGWARDEN_EXPECT_ROLE, optional PGWARDEN_OTHER_USER / _PASSWORD / _ROLE,
// PGWARDEN_RUN (unique among concurrent runs: names the table and id range);
// PGWARDEN_JDBC_APPNAME=startup sends the application name at startup
// (assumeMinServerVersion=9.0) instead of with SET after login.

import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.concurrent.TimeUnit;

public class JdbcSuite {
    // This run's own table and id range in the shared items table.
    static final int RUN = Integer.parseInt(System.getenv().getOrDefault("PGWARDEN_RUN", "0"));
    static final String TABLE = "drv_jdbc_" + RUN;
    static final int ITEMS_BASE = 13_000_000 + RUN * 10_000;
    static final int THREADS = 6;
    static final int ROUNDS = 30;
    static final String IDENTITY_SQL =
        "SELECT current_user::text, current_setting('app.client_user'),"
            + " (SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid())";

    record Identity(String user, String password, String role) {
        @Override
        public String toString() {
            return user + "->" + role;
        }
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            throw new IllegalStateException("environment variable " + name + " is not set");
        }
        return v;
    }

    static List<Identity> identities() {
        List<Identity> ids = new ArrayList<>();
        ids.add(new Identity(env("PGUSER"), env("PGPASSWORD"), env("PGWARDEN_EXPECT_ROLE")));
        if (System.getenv("PGWARDEN_OTHER_USER") != null) {
            ids.add(new Identity(env("PGWARDEN_OTHER_USER"), env("PGWARDEN_OTHER_PASSWORD"),
                env("PGWARDEN_OTHER_ROLE")));
        }
        return ids;
    }

    static Connection connect(Identity id, String app) throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/"
            + env("PGDATABASE");
        Properties p = new Properties();
        p.setProperty("user", id.user());
        p.setProperty("password", id.password());
        p.setProperty("ApplicationName", app);
        p.setProperty("prepareThreshold", "1");
        p.setProperty("sslmode", "disable");
        p.setProperty("connectTimeout", "10");
        if ("startup".equals(System.getenv("PGWARDEN_JDBC_APPNAME"))) {
            // Send ApplicationName in the StartupMessage instead of pgjdbc's
            // default `SET application_name` right after login.
            p.setProperty("assumeMinServerVersion", "9.0");
        }
        return DriverManager.getConnection(url, p);
    }

    static void check(boolean cond, String what) {
        if (!cond) {
            throw new AssertionError(what);
        }
    }

    static void expectEq(Object got, Object want, String what) {
        if (!Objects.equals(got, want)) {
            throw new AssertionError(what + ": got " + got + ", want " + want);
        }
    }

    static void step(String what) {
        System.out.println("ok: " + what);
    }

    static void checkIdentity(PreparedStatement identity, Identity id, String app)
        throws SQLException {
        try (ResultSet rs = identity.executeQuery()) {
            check(rs.next(), "identity: no row");
            expectEq(List.of(rs.getString(1), rs.getString(2), rs.getString(3)),
                List.of(id.role(), id.user(), app + " [" + id.user() + "]"), "identity");
        }
    }

    static long count(Connection c, String where) throws SQLException {
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("SELECT count(*) FROM " + TABLE + " WHERE " + where)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void reusedStatement(Connection c, Identity id) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(
                 "SELECT ?::int * 2, current_setting('app.client_user')")) {
            for (int i = 0; i < 100; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "no row");
                    expectEq(rs.getInt(1), 2 * i, "reused statement round " + i);
                    expectEq(rs.getString(2), id.user(), "client user round " + i);
                }
            }
            check(ps.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(),
                "pgjdbc did not switch to a server-prepared statement");
        }
        // The server-side statement sees itself among the prepared ones.
        try (PreparedStatement ps = c.prepareStatement(
                 "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE ?"
                     + " AND 'jdbc-marker' IS NOT NULL")) {
            for (int i = 0; i < 3; i++) {
                ps.setString(1, "%jdbc-marker%");
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    check(rs.getLong(1) >= 1, "statement is not server-side prepared");
                }
            }
        }
        step("PreparedStatement reused 100 times, server-prepared (prepareThreshold=1)");
    }

    static void batchAndTransactions(Connection c) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS " + TABLE);
            s.execute("CREATE TABLE " + TABLE + " (id int PRIMARY KEY, owner text, payload bytea)");
        }
        String insert = "INSERT INTO " + TABLE + " (id, owner, payload) VALUES (?, ?, ?)";
        try (PreparedStatement ps = c.prepareStatement(insert)) {
            for (int i = 1; i <= 500; i++) {
                ps.setInt(1, i);
                ps.setString(2, "batch-" + i);
                ps.setBytes(3, new byte[] {(byte) i, 0, (byte) 255});
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            expectEq(counts.length, 500, "batch size");
            for (int n : counts) {
                expectEq(n, 1, "batch row count");
            }
        }
        expectEq(count(c, "id <= 500"), 500L, "batch rows");
        // Transactions: commit, rollback, savepoint, an error then rollback.
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement(insert)) {
            ps.setInt(1, 1001);
            ps.setString(2, "committed");
            ps.setBytes(3, null);
            ps.executeUpdate();
            c.commit();
            ps.setInt(1, 1002);
            ps.setString(2, "rolled back");
            ps.executeUpdate();
            c.rollback();
            ps.setInt(1, 1003);
            ps.setString(2, "kept");
            ps.executeUpdate();
            Savepoint sp = c.setSavepoint();
            ps.setInt(1, 1004);
            ps.setString(2, "undone");
            ps.executeUpdate();
            c.rollback(sp);
            c.commit();
            // An error inside a transaction: the whole transaction goes.
            ps.setInt(1, 1005);
            ps.setString(2, "lost");
            ps.executeUpdate();
            try {
                ps.setInt(1, 1);
                ps.setString(2, "duplicate");
                ps.executeUpdate();
                throw new AssertionError("duplicate key did not raise");
            } catch (SQLException e) {
                expectEq(e.getSQLState(), "23505", "duplicate key SQLSTATE");
            }
            try (Statement s = c.createStatement()) {
                s.executeQuery("SELECT 1");
                throw new AssertionError("statement in a failed transaction ran");
            } catch (SQLException e) {
                expectEq(e.getSQLState(), "25P02", "in failed transaction");
            }
            c.rollback();
            // A batch with a failing row is rolled back whole.
            for (int id : new int[] {2001, 2002, 2}) {
                ps.setInt(1, id);
                ps.setString(2, "bad batch");
                ps.setBytes(3, null);
                ps.addBatch();
            }
            try {
                ps.executeBatch();
                throw new AssertionError("batch with a duplicate key did not raise");
            } catch (BatchUpdateException e) {
                expectEq(e.getSQLState(), "23505", "batch SQLSTATE");
            }
            c.rollback();
        } finally {
            c.setAutoCommit(true);
        }
        List<Long> got = new ArrayList<>();
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery(
                 "SELECT id FROM " + TABLE + " WHERE id > 1000 ORDER BY id")) {
            while (rs.next()) {
                got.add(rs.getLong(1));
            }
        }
        expectEq(got, List.of(1001L, 1003L), "committed rows");
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE " + TABLE);
        }
        step("batch insert; commit, rollback, savepoint; errors inside transactions");
    }

    static void fetchSizeCursor(Connection c) throws SQLException {
        // With autocommit off and a fetch size, pgjdbc reads through a named
        // portal, a few rows per Execute (PortalSuspended in between).
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement(
                 "SELECT g, repeat('x', g % 50) FROM generate_series(1, ?) g ORDER BY g")) {
            ps.setFetchSize(25);
            for (int round = 0; round < 3; round++) {
                ps.setInt(1, 1000);
                long sum = 0;
                int rows = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        sum += rs.getInt(1);
                        rows++;
                        expectEq(rs.getString(2).length(), rs.getInt(1) % 50, "row text");
                    }
                }
                expectEq(rows, 1000, "rows through the portal");
                expectEq(sum, 500500L, "sum through the portal");
            }
            c.commit();
        } finally {
            c.setAutoCommit(true);
        }
        step("fetchSize 25 inside a transaction: named portal, 40 Executes per query");
    }

    static void worker(int n, Identity id, List<String> failures) {
        String app = "drv-jdbc-" + n;
        int base = ITEMS_BASE + n * 1000;
        try (Connection c = connect(id, app);
             PreparedStatement identity = c.prepareStatement(IDENTITY_SQL);
             PreparedStatement ins = c.prepareStatement(
                 "INSERT INTO items (id, owner, payload) VALUES (?, ?, ?)");
             PreparedStatement sel = c.prepareStatement(
                 "SELECT owner, current_setting('app.client_user') FROM items WHERE id = ?")) {
            for (int i = 0; i < ROUNDS; i++) {
                checkIdentity(identity, id, app);
                c.setAutoCommit(false);
                ins.setInt(1, base + i);
                ins.setString(2, id.user());
                ins.setBytes(3, new byte[] {(byte) n, (byte) i});
                expectEq(ins.executeUpdate(), 1, "insert");
                sel.setInt(1, base + i);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next(), "own row missing");
                    expectEq(List.of(rs.getString(1), rs.getString(2)),
                        List.of(id.user(), id.user()), "own row");
                }
                if (i % 2 == 0) {
                    c.commit();
                } else {
                    c.rollback();
                }
                c.setAutoCommit(true);
            }
            try (PreparedStatement del = c.prepareStatement(
                     "DELETE FROM items WHERE id >= ? AND id < ? AND owner = ?")) {
                del.setInt(1, base);
                del.setInt(2, base + 1000);
                del.setString(3, id.user());
                expectEq(del.executeUpdate(), ROUNDS / 2, "committed rows deleted");
            }
        } catch (Throwable e) {
            failures.add("thread " + n + " (" + id + "): " + e);
        }
    }

    static void concurrent() throws InterruptedException {
        List<Identity> ids = identities();
        List<String> failures = Collections.synchronizedList(new ArrayList<>());
        List<Thread> threads = new ArrayList<>();
        for (int n = 0; n < THREADS; n++) {
            final int k = n;
            Thread t = new Thread(() -> worker(k, ids.get(k % ids.size()), failures));
            t.start();
            threads.add(t);
        }
        for (Thread t : threads) {
            t.join(TimeUnit.SECONDS.toMillis(60));
            check(!t.isAlive(), "a thread did not finish within 60 s");
        }
        check(failures.isEmpty(), String.join("; ", failures));
        step(THREADS + " threads x " + ROUNDS + " transactions, identities " + ids);
    }

    public static void main(String[] args) {
        try {
            Identity id = identities().get(0);
            try (Connection c = connect(id, "drv-jdbc");
                 PreparedStatement identity = c.prepareStatement(IDENTITY_SQL)) {
                checkIdentity(identity, id, "drv-jdbc");
                step("identity");
                reusedStatement(c, id);
                batchAndTransactions(c);
                fetchSizeCursor(c);
                concurrent();
                checkIdentity(identity, id, "drv-jdbc");
            }
        } catch (Throwable e) {
            e.printStackTrace();
            System.err.println("FAIL: " + e);
            System.exit(1);
        }
        System.out.println("PASS");
    }
}
