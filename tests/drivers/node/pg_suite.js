// node-postgres (`pg`) through pgwarden in transaction pooling.
//
// Named queries ({ name, text, values }) are parsed once per connection by
// pg and then only bound and executed, so they must survive the client
// moving between server connections. Covers: identity, a named query reused
// many times, the same name meaning different statements on two
// connections, parameter types, a transaction with an error and ROLLBACK,
// a savepoint, and two Pools (two identities) larger than the gateway's
// pool running many queries at once. Exits non-zero on the first failure.
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE,
// PGWARDEN_EXPECT_ROLE, optional PGWARDEN_OTHER_USER / _PASSWORD / _ROLE,
// PGWARDEN_RUN (unique among concurrent runs: names the table and id range).
'use strict';

const assert = require('node:assert/strict');
const { Client, Pool } = require('pg');

// This run's own table and id range in the shared items table.
const RUN = Number(process.env.PGWARDEN_RUN || '0');
const TABLE = `drv_node_${RUN}`;
const ITEMS_BASE = 12_000_000 + RUN * 10_000;

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}

function identities() {
  const ids = [{ user: env('PGUSER'), password: env('PGPASSWORD'), role: env('PGWARDEN_EXPECT_ROLE') }];
  if (process.env.PGWARDEN_OTHER_USER) {
    ids.push({
      user: env('PGWARDEN_OTHER_USER'),
      password: env('PGWARDEN_OTHER_PASSWORD'),
      role: env('PGWARDEN_OTHER_ROLE'),
    });
  }
  return ids;
}

function config(ident, app, extra = {}) {
  return {
    host: env('PGHOST'),
    port: Number(env('PGPORT')),
    database: env('PGDATABASE'),
    user: ident.user,
    password: ident.password,
    application_name: app,
    connectionTimeoutMillis: 10000,
    ...extra,
  };
}

const IDENTITY = {
  name: 'drv_identity',
  text:
    "SELECT current_user::text AS role, current_setting('app.client_user') AS client, " +
    '(SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()) AS app',
};

async function checkIdentity(q, ident, app) {
  const { rows } = await q.query(IDENTITY);
  assert.deepEqual(rows[0], { role: ident.role, client: ident.user, app: `${app} [${ident.user}]` }, 'identity');
}

function step(what) {
  console.log(`ok: ${what}`);
}

async function namedQueries(client, ident) {
  const q1 = { name: 'q1', text: "SELECT $1::int + 1 AS n, current_setting('app.client_user') AS who" };
  for (let i = 0; i < 100; i++) {
    const { rows } = await client.query({ ...q1, values: [i] });
    assert.deepEqual(rows[0], { n: i + 1, who: ident.user }, `named query round ${i}`);
  }
  // The statement is a server-side named statement: it sees itself.
  const seen = await client.query({
    name: 'q_seen',
    text: "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement LIKE '%node-marker%'",
  });
  assert.ok(seen.rows[0].n >= 1, 'named query is not server-side prepared');
  // A second connection gives the same name another meaning.
  const other = new Client(config(ident, 'drv-node-other'));
  await other.connect();
  try {
    const q1b = { name: 'q1', text: "SELECT $1::text || '-b' AS n, pg_backend_pid() AS pid" };
    for (let i = 0; i < 30; i++) {
      const [a, b] = await Promise.all([
        client.query({ ...q1, values: [i] }),
        other.query({ ...q1b, values: [String(i)] }),
      ]);
      assert.equal(a.rows[0].n, i + 1, 'q1 on the first connection');
      assert.equal(b.rows[0].n, `${i}-b`, 'q1 on the second connection');
    }
  } finally {
    await other.end();
  }
  // Types through a named query with several parameters.
  const typed = await client.query({
    name: 'q_types',
    text: 'SELECT $1::bytea AS b, $2::jsonb AS j, $3::timestamptz AS t, $4::numeric AS x, $5::text[] AS a',
    values: [Buffer.from([0, 1, 255]), { k: [1, 'two'] }, new Date('2024-02-29T12:00:00Z'), '12345678901234567890.5', ['a', null]],
  });
  const r = typed.rows[0];
  assert.deepEqual([...r.b], [0, 1, 255], 'bytea');
  assert.deepEqual(r.j, { k: [1, 'two'] }, 'jsonb');
  assert.equal(r.t.toISOString(), '2024-02-29T12:00:00.000Z', 'timestamptz');
  assert.equal(r.x, '12345678901234567890.5', 'numeric');
  assert.deepEqual(r.a, ['a', null], 'text[]');
  step('named queries: 100 reuses, same name on two connections, types');
}

async function transactions(client) {
  await client.query(`DROP TABLE IF EXISTS ${TABLE}`);
  await client.query(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, owner text)`);
  const ins = (id, owner) => client.query({ name: 'ins', text: `INSERT INTO ${TABLE} VALUES ($1, $2)`, values: [id, owner] });
  // An error inside a transaction, then ROLLBACK.
  await client.query('BEGIN');
  await ins(1, 'lost');
  await assert.rejects(ins(1, 'dup'), (e) => e.code === '23505', 'duplicate key');
  await assert.rejects(client.query('SELECT 1'), (e) => e.code === '25P02', 'in failed transaction');
  await client.query('ROLLBACK');
  let { rows } = await client.query(`SELECT count(*)::int AS n FROM ${TABLE}`);
  assert.equal(rows[0].n, 0, 'rolled back');
  // A savepoint, then COMMIT.
  await client.query('BEGIN');
  await ins(2, 'kept');
  await client.query('SAVEPOINT s1');
  await assert.rejects(client.query('SELECT 1/0'), (e) => e.code === '22012', 'division by zero');
  await client.query('ROLLBACK TO SAVEPOINT s1');
  await ins(3, 'kept');
  await client.query('COMMIT');
  ({ rows } = await client.query(`SELECT array_agg(id ORDER BY id) AS ids FROM ${TABLE}`));
  assert.deepEqual(rows[0].ids, [2, 3], 'savepoint and commit');
  // An error outside a transaction leaves the connection usable.
  await assert.rejects(client.query('SELECT * FROM no_such_table'), (e) => e.code === '42P01', 'undefined table');
  ({ rows } = await client.query({ text: 'SELECT 1 AS one', rowMode: 'array' }));
  assert.deepEqual(rows, [[1]], 'usable after an error');
  await client.query(`DROP TABLE ${TABLE}`);
  step('transaction with error and ROLLBACK; savepoint; COMMIT');
}

async function pools() {
  const ids = identities();
  const pools = ids.map((ident, k) => new Pool(config(ident, `drv-node-pool-${k}`, { max: 6 })));
  try {
    const tasks = [];
    for (let n = 0; n < 48; n++) {
      const k = n % ids.length;
      const ident = ids[k];
      const pool = pools[k];
      if (n % 4 === 0) {
        // A whole transaction on one pooled client.
        tasks.push(
          (async () => {
            const c = await pool.connect();
            const id = ITEMS_BASE + n;
            try {
              await c.query('BEGIN');
              await c.query({ name: 'ins_item', text: 'INSERT INTO items (id, owner) VALUES ($1, $2)', values: [id, ident.user] });
              const { rows } = await c.query({
                name: 'own_item',
                text: "SELECT owner, current_setting('app.client_user') AS who FROM items WHERE id = $1",
                values: [id],
              });
              assert.deepEqual(rows[0], { owner: ident.user, who: ident.user }, 'own row');
              await c.query('ROLLBACK');
            } finally {
              c.release();
            }
          })(),
        );
      } else {
        tasks.push(
          (async () => {
            for (let i = 0; i < 10; i++) await checkIdentity(pool, ident, `drv-node-pool-${k}`);
          })(),
        );
      }
    }
    await Promise.all(tasks);
    const { rows } = await pools[0].query('SELECT count(*)::int AS n FROM items WHERE id >= $1 AND id < $2', [ITEMS_BASE, ITEMS_BASE + 1000]);
    assert.equal(rows[0].n, 0, 'rolled-back rows are gone');
    step(`pools of 6 x ${ids.length} identities (${ids.map((i) => i.user).join(', ')}), 48 concurrent tasks`);
  } finally {
    await Promise.all(pools.map((p) => p.end()));
  }
}

async function main() {
  const ident = identities()[0];
  const client = new Client(config(ident, 'drv-node'));
  await client.connect();
  try {
    await checkIdentity(client, ident, 'drv-node');
    step('identity');
    await namedQueries(client, ident);
    await transactions(client);
    await pools();
    await checkIdentity(client, ident, 'drv-node');
  } finally {
    await client.end();
  }
}

const timer = setTimeout(() => {
  console.error('FAIL: pg_suite.js did not finish within 60 s');
  process.exit(1);
}, 60_000);

main().then(
  () => {
    clearTimeout(timer);
    console.log('PASS');
  },
  (e) => {
    console.error(e);
    console.error(`FAIL: ${e.message}`);
    process.exit(1);
  },
);
