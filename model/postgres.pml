/*
 * PlaceOrder on Postgres, statement by statement, as src/store/place.rs and
 * src/store/postgres/ run it at READ COMMITTED; checked with spin
 * (model/check runs every configuration and checks each verdict).
 *
 * One idempotency key, two callers (two replicas' calls, retried), a clock,
 * the purge, crashes of the service at every step (a crash rolls back what
 * was not committed; after a COMMIT it loses the reply), the caller's lock
 * wait running out, and a failover to a standby.
 *
 * Each step names the function it mirrors:
 *   insert_key_and_order  PlaceTx::insert_key_and_order for PgConnection: one
 *                         statement; it waits for the key's advisory lock
 *                         (held to the transaction's end), its NOT EXISTS (an order younger than
 *                         the lifetime) is read from the statement's snapshot,
 *                         then the insert waits on the key's unique index and
 *                         does nothing if the key was committed meanwhile
 *   read_key              PlaceTx::read_key: the key row and its order, live if
 *                         unexpired; no row (purged): the newest order younger
 *                         than the lifetime binds
 *   replace_expired_key   PlaceTx::replace_expired_key: waits on the row lock,
 *                         then re-checks the newest row version (EvalPlanQual)
 *   insert_order          PlaceTx::insert_order
 *   batch_path            group commit (postgres/group_commit.rs): the batch's
 *                         one statement, committed as it runs; it only tries
 *                         the key's advisory lock; a key it did not insert is
 *                         looked up after it (a live key answered: replayed or
 *                         refused), else (locked elsewhere, expired, purged,
 *                         or the batch refused) placed alone on the paths below;
 *                         a key locked elsewhere waits there only with a place
 *                         in the pool's share for such waits, else KeyInUse
 *                         at once (PgStore::key_waiters)
 *   one_statement_path    PgStore::place_one without a transaction
 *                         (place::place_new_or_live; with group commit off
 *                         its first attempt only tries the key's lock:
 *                         try_insert_key_and_order, see `alone`)
 *   transaction_path      PgStore::place_one's transaction (place::place,
 *                         ROUNDS rounds, then KeyInUse)
 *   purge                 Statements::delete_expired_keys for PgStore
 *                         (statement_timestamp(), skip locked)
 *   commit                COMMIT; with a synchronous standby it returns once
 *                         the standby has the commit
 *
 * Configurations (-D flags; model/check lists the verdict each must give):
 *   FAILOVER     the primary fails once, mid-run, and its standby takes over
 *   ASYNC        with FAILOVER: the standby is asynchronous (must fail:
 *                acknowledged orders lost at failover)
 *   REUSE        the second caller sends the key with another payload
 *   NO_BATCH     without the group-commit path (--pg-max-batch 1)
 *   BATCH_BOTH   both callers' first attempts may ride a batch (by default
 *                only the first caller's does: the bound that fits minutes)
 *   NO_ADVISORY  the ordinary paths without the advisory lock (a replica of
 *                a version before group commit, in a rolling upgrade): a
 *                batch can meet a key row they hold, waits out its short
 *                lock wait, is refused and places the key alone. The
 *                mutants below run with NO_BATCH NO_ADVISORY: the ordinary
 *                path must stand on its own unique index and re-checks
 *   NO_TRY_LOCK  mutant: the batch inserts without trying the key's advisory
 *                lock, and meets a key row another call holds: the batch
 *                would wait for it (must fail: "the batch never waits")
 *   NO_UNIQUE    mutant: no unique index to wait on (must fail)
 *   NO_RECHECK   mutant: replace_expired_key without the re-check (must fail)
 *   PURGE_AHEAD  mutant: the purge's clock runs ahead of the deciding clock,
 *                and no order guard (the protocol before issue 10: must fail)
 *   PURGE_AHEAD_GUARDED  the purge ahead, with the order guard: must fail
 *                too. The guard's NOT EXISTS reads the statement's snapshot,
 *                taken before the insert waits on the unique index; a racing
 *                call commits the key and its order, a purge whose clock runs
 *                ahead deletes that key, and the waiting insert finds no
 *                conflict and a stale "no young order". What makes Postgres
 *                safe is that the purge reads the database's clock
 *                (statement_timestamp()), the clock that set the expiry.
 */

#define NCALLERS  2
#define TTL       1
#define MAXNOW    2
#define MAXORDERS 8
#define ROUNDS    3
#define ATTEMPTS  2
#define NONE      255

/* Replies, as the caller sees them. */
#define ACK         1  /* the order (created or replayed) */
#define REFUSED     2  /* KeyReused: nothing written */
#define NOT_WRITTEN 3  /* KeyInUse, Unavailable before the write was sent */
#define UNKNOWN     4  /* a lost reply: the write may have been committed */

byte now = 0;               /* the database server's clock */

/* The primary's committed state, and what one transaction has not committed. */
bool key_exists;
byte key_fp, key_order, key_expire;
byte key_lock = 0;           /* the transaction holding the key's row/index lock */
byte adv = 0;                /* the transaction holding the key's advisory lock */
bool pk_pending;             /* that transaction's key row (insert or replace) */
byte pk_fp, pk_order, pk_expire;
byte n_orders = 0;
byte order_fp[MAXORDERS];
byte order_created[MAXORDERS];
bool order_committed[MAXORDERS];
byte order_tx[MAXORDERS];    /* NONE once committed or rolled back */

/* The standby's copy of the committed state. */
bool s_key_exists;
byte s_key_fp, s_key_order, s_key_expire;
bool s_order_committed[MAXORDERS];

byte crashes = 0;            /* service crashes, bounded */
bool failed_over = false;
byte acked[NCALLERS + 1];    /* the order each caller was acknowledged */
byte done = 0;

/* Two orders of the key are at least the lifetime apart. */
inline check_spacing(o) {
  for (j : 0 .. n_orders - 1) {
    if
    :: j != o && order_committed[j] -> assert(order_created[j] + TTL <= order_created[o] || order_created[o] + TTL <= order_created[j])
    :: else -> skip
    fi
  }
}

inline replicate() {
  s_key_exists = key_exists; s_key_fp = key_fp; s_key_order = key_order; s_key_expire = key_expire;
  for (r : 0 .. MAXORDERS - 1) { s_order_committed[r] = order_committed[r] }
}

/* ROLLBACK (or the backend gone): nothing of t stays. */
inline rollback(t) {
  atomic {
    if :: key_lock == t -> key_lock = 0; pk_pending = false :: else -> skip fi;
    if :: adv == t -> adv = 0 :: else -> skip fi;
    for (b : 0 .. n_orders - 1) {
      if :: order_tx[b] == t -> order_tx[b] = NONE :: else -> skip fi
    }
  }
}

/* COMMIT of transaction t: its key row and orders become visible; lost
   if the primary failed over since the transaction began (its connection
   is gone: the caller hears nothing). */
inline commit(t) {
  atomic {
    lost = (epoch != failed_over);
    if
    :: lost -> rollback(t)
    :: !lost ->
    if
    :: key_lock == t && pk_pending ->
       key_exists = true; key_fp = pk_fp; key_order = pk_order; key_expire = pk_expire;
       pk_pending = false
    :: else -> skip
    fi;
    if :: key_lock == t -> key_lock = 0 :: else -> skip fi;
    if :: adv == t -> adv = 0 :: else -> skip fi;
    for (c : 0 .. n_orders - 1) {
      if
      :: order_tx[c] == t -> order_committed[c] = true; order_tx[c] = NONE; wrote = true; check_spacing(c)
      :: else -> skip
      fi
    }
#ifndef ASYNC
    replicate()   /* a synchronous standby has the commit before it returns */
#endif
    fi
  }
}

/* A committed order of the key younger than the lifetime? (Snapshot read.) */
inline young_order(result) {
  result = false;
  for (y : 0 .. n_orders - 1) {
    if :: order_committed[y] && order_created[y] + TTL > now -> result = true :: else -> skip fi
  }
}

inline add_order(t, fp, o) {
  assert(n_orders < MAXORDERS);
  o = n_orders; order_fp[o] = fp; order_created[o] = now; order_committed[o] = false; order_tx[o] = t;
  n_orders++
}

/* insert_key_and_order: created is the new order, or NONE; timed_out if
   the lock wait ran out (KeyInUse). */
inline insert_key_and_order(t, fp, created, timed_out) {
  created = NONE; timed_out = false; lost = false;
#ifdef PURGE_AHEAD
  guard = false;              /* before issue 10: no order guard */
#else
  young_order(guard);         /* from the statement's snapshot */
#endif
#ifdef NO_UNIQUE
  atomic {
    if
    :: epoch != failed_over -> lost = true
    :: epoch == failed_over && !key_exists && !guard ->
       pk_pending = true; key_lock = t; pk_fp = fp; add_order(t, fp, created);
       pk_order = created; pk_expire = now + TTL
    :: else -> skip
    fi
  }
#else
  if
#ifdef NO_ADVISORY
  :: atomic { (key_lock == 0 || key_lock == t) ->
#else
  :: atomic { (adv == 0 || adv == t) && (key_lock == 0 || key_lock == t) ->
#endif
       if
       :: epoch != failed_over -> lost = true   /* the connection died with the old primary */
       :: epoch == failed_over ->
#ifndef NO_ADVISORY
          adv = t;                              /* the key's advisory lock, to the end */
#endif
          if
          :: !key_exists && !guard ->
             key_lock = t; pk_pending = true; pk_fp = fp; add_order(t, fp, created);
             pk_order = created; pk_expire = now + TTL
          :: else -> skip
          fi
       fi }
#ifdef NO_ADVISORY
  :: atomic { (key_lock != 0 && key_lock != t) -> timed_out = true }
#else
  :: atomic { ((adv != 0 && adv != t) || (key_lock != 0 && key_lock != t)) -> timed_out = true }
#endif
  fi
#endif
}

/* read_key: the stored fingerprint (NONE without a key row), its order, live. */
inline read_key(s_fp, s_order, s_live) {
  atomic {
    s_order = NONE; s_fp = NONE; s_live = false;
    if
    :: key_exists -> s_fp = key_fp; s_order = key_order; s_live = (key_expire > now)
    :: else ->
       for (n : 0 .. n_orders - 1) {
         if
         :: order_committed[n] && order_created[n] + TTL > now ->
            if :: s_order == NONE || order_created[n] >= order_created[s_order] -> s_order = n :: else -> skip fi
         :: else -> skip
         fi
       }
       s_live = (s_order != NONE)
    fi
  }
}

/* replace_expired_key: replaced, or timed_out. */
inline replace_expired_key(t, fp, replaced, timed_out) {
  replaced = false; timed_out = false; lost = false;
#ifdef NO_RECHECK
  stale = key_exists && key_expire <= now;     /* read before the wait... */
#endif
  if
  :: atomic { (key_lock == 0 || key_lock == t) ->
       if
       :: epoch != failed_over -> lost = true
#ifdef NO_RECHECK
       :: epoch == failed_over && stale -> replaced = true; key_lock = t   /* ...and not re-checked */
#else
       :: epoch == failed_over && key_exists && key_expire <= now -> replaced = true; key_lock = t
#endif
       :: else -> skip
       fi
     }
  :: atomic { (key_lock != 0 && key_lock != t) -> timed_out = true }
  fi
}

/* A crash of the service here, within the budget: what it had not
   committed is rolled back, and its caller hears nothing. */
#define CRASH_POINT(t) if :: crashes < 1 -> crashes++; rollback(t); reply = UNKNOWN; goto answered :: skip fi

proctype Caller(byte me; byte fp) {
  byte attempts = 0, reply, created, o, s_fp, s_order, rounds;
  bool timed_out, s_live, same, replaced, wrote, lost, epoch, guard, stale, took, stalled;
  byte b, c, j, n, r, y;   /* loop counters of the inlines */
  do
  :: attempts < ATTEMPTS ->
     attempts++; wrote = false; epoch = failed_over;
#ifndef NO_BATCH
     if
#ifdef BATCH_BOTH
     :: attempts == 1 ->
#else
     :: attempts == 1 && me == 1 ->
#endif
        /* (a first attempt; in the configurations that fit a few minutes,
           the first caller's only: the other caller and retries take the
           ordinary paths, as a call on another replica or a job sent back) */
        /* batch_path: group commit, one statement committed as it runs
           (postgres/group_commit.rs INSERT_BATCH); the key's advisory lock
           only tried: a key locked elsewhere is left out, to be placed
           alone (write_batch -> Written::Alone -> place_one) */
        young_order(guard);
        atomic {
          if
          :: epoch != failed_over -> lost = true
          :: else ->
             lost = false; stalled = false;
#ifdef NO_TRY_LOCK
             took = true;                /* mutant: the lock not tried */
#else
             took = (adv == 0 || adv == me);
#endif
             if
             :: took ->
                adv = me;
                created = NONE;
                if
                :: key_lock != 0 && key_lock != me ->
                   /* another call holds the key's row: the batch would wait */
#ifndef NO_ADVISORY
                   assert(false);  /* never, when every writer takes the advisory lock */
#endif
                   stalled = true  /* a writer without it: the batch's lock wait runs
                                      out, the database refuses it, placed alone */
                :: else -> skip
                fi;
                if
                :: stalled -> skip
                :: !stalled && !key_exists && !guard ->
                   key_lock = me; pk_pending = true; pk_fp = fp; add_order(me, fp, created);
                   pk_order = created; pk_expire = now + TTL
                :: else -> skip
                fi
             :: else -> skip
             fi
          fi
        }
        if :: lost -> rollback(me); reply = UNKNOWN; goto answered :: else -> skip fi;
        if :: stalled -> rollback(me); goto alone :: else -> skip fi;
        if
        :: took ->
           if
           :: true -> skip
           :: true -> rollback(me); goto alone   /* the database refused the batch: placed alone */
           fi;
           CRASH_POINT(me);
           commit(me);
           if :: lost -> reply = UNKNOWN; goto answered :: else -> skip fi;
           CRASH_POINT(me);
           if :: created != NONE -> o = created; reply = ACK; goto answered :: else -> skip fi
        :: else -> skip
        fi;
        /* the keys the batch did not insert, looked up after its commit
           (group_commit.rs read_keys: key rows only): a live one answered */
        atomic {
          s_live = false;
          if :: key_exists -> s_fp = key_fp; s_order = key_order; s_live = (key_expire > now) :: else -> skip fi
        }
        if
        :: s_live && s_fp == fp -> o = s_order; reply = ACK; goto answered
        :: s_live && s_fp != fp -> reply = REFUSED; goto answered
        :: else -> skip   /* placed alone */
        fi
     :: true -> skip
     fi;
#endif
alone:
     /* a key held by another call in flight is waited for only with a place
        in the pool's share for such waits (PgStore::key_waiters); without
        one: KeyInUse at once, nothing written. The batch tells a key held
        elsewhere by trying its lock; with group commit off the ordinary
        path's first statement only tries it (try_insert_key_and_order, or
        try_key_lock in the transaction), which writes nothing when the lock
        is held. Either way nothing is written before the refusal: modelled
        as a refusal that may come on any attempt. */
     if :: true -> skip :: true -> reply = NOT_WRITTEN; goto answered fi;
     if
     :: true ->
        /* one_statement_path: the insert commits on its own */
        insert_key_and_order(me, fp, created, timed_out);
        if :: timed_out -> reply = NOT_WRITTEN; goto answered :: else -> skip fi;
        if :: lost -> rollback(me); reply = UNKNOWN; goto answered :: else -> skip fi;
        CRASH_POINT(me);
        commit(me);
        if :: lost -> reply = UNKNOWN; goto answered :: else -> skip fi;
        CRASH_POINT(me);
        if :: created != NONE -> o = created; reply = ACK; goto answered :: else -> skip fi;
        read_key(s_fp, s_order, s_live);
        same = s_live && (s_fp == fp || (s_fp == NONE && order_fp[s_order] == fp));
        if
        :: s_live && same -> o = s_order; reply = ACK; goto answered
        :: s_live && !same -> reply = REFUSED; goto answered
        :: else -> skip   /* expired: the transaction below */
        fi
     :: true -> skip      /* a lock wait shorter than lock_timeout: the transaction */
     fi;
     /* transaction_path */
     rounds = 0;
     do
     :: rounds < ROUNDS ->
        rounds++;
        insert_key_and_order(me, fp, created, timed_out);
        if :: timed_out -> rollback(me); reply = NOT_WRITTEN; goto answered :: else -> skip fi;
        if :: lost -> rollback(me); reply = UNKNOWN; goto answered :: else -> skip fi;
        CRASH_POINT(me);
        if :: created != NONE -> o = created; goto committing :: else -> skip fi;
        read_key(s_fp, s_order, s_live);
        same = s_live && (s_fp == fp || (s_fp == NONE && order_fp[s_order] == fp));
        if
        :: s_order == NONE -> skip    /* purged in between: insert again */
        :: s_order != NONE && s_live && same -> rollback(me); o = s_order; reply = ACK; goto answered
        :: s_order != NONE && s_live && !same -> rollback(me); reply = REFUSED; goto answered
        :: s_order != NONE && !s_live ->
           replace_expired_key(me, fp, replaced, timed_out);
           if :: timed_out -> rollback(me); reply = NOT_WRITTEN; goto answered :: else -> skip fi;
           if :: lost -> rollback(me); reply = UNKNOWN; goto answered :: else -> skip fi;
           if
           :: replaced -> atomic {
                if
                :: epoch != failed_over -> lost = true
                :: else -> add_order(me, fp, o); pk_pending = true; pk_fp = fp; pk_order = o; pk_expire = now + TTL
                fi };
              if :: lost -> rollback(me); reply = UNKNOWN; goto answered :: else -> skip fi;
              CRASH_POINT(me);
              goto committing
           :: else -> skip   /* another call replaced it first: read it again */
           fi
        fi
     :: else -> rollback(me); reply = NOT_WRITTEN; goto answered   /* KeyInUse */
     od;
committing:
     commit(me);
     if :: lost -> reply = UNKNOWN; goto answered :: else -> skip fi;
     CRASH_POINT(me);
     reply = ACK;
answered:
     if
     :: reply == ACK ->
        assert(order_committed[o] && order_fp[o] == fp);   /* acknowledged: committed, its payload */
        acked[me] = o; break
     :: reply == REFUSED -> assert(!wrote); break          /* refused: nothing written */
     :: reply == NOT_WRITTEN -> assert(!wrote)             /* "not written" is true */
     :: reply == UNKNOWN -> skip                           /* retry with the same key */
     fi
  :: else -> break
  od;
  done++
}

/* The database server's clock. */
active proctype Clock() {
end: do
  :: now < MAXNOW -> now++
  :: done == NCALLERS -> break
  od
}

/* The purge, on any replica: deletes the key row once expired on its
   clock, skipping a row another transaction holds. */
active proctype Purge() {
  byte purge_now, r, last = NONE;
end: do
  :: atomic { last != now -> last = now;   /* once a tick: all it can do */
#if defined(PURGE_AHEAD) || defined(PURGE_AHEAD_GUARDED)
       purge_now = now + 1;
#else
       purge_now = now;
#endif
       if
       :: key_exists && key_expire <= purge_now && key_lock == 0 -> key_exists = false
#ifndef ASYNC
          ; replicate()
#endif
       :: else -> skip
       fi }
  :: done == NCALLERS -> break
  od
}

#if defined(ASYNC) && !defined(FAILOVER)
#error ASYNC needs FAILOVER
#endif
#ifdef ASYNC
/* Replication to an asynchronous standby, at its own pace. */
active proctype Replicate() {
  byte r;
end: do
  :: atomic { !failed_over -> replicate() }
  :: done == NCALLERS -> break
  od
}
#endif

/* The primary fails once: the standby, promoted, is the database; what was
   not committed is gone, and every call in flight fails. */
#ifdef FAILOVER
active proctype Failover() {
  byte f;
  if
  :: atomic {
       failed_over = true;
       key_exists = s_key_exists; key_fp = s_key_fp; key_order = s_key_order; key_expire = s_key_expire;
       key_lock = 0; adv = 0; pk_pending = false;
       for (f : 0 .. MAXORDERS - 1) { order_committed[f] = s_order_committed[f]; order_tx[f] = NONE }
     }
  :: skip
  fi
}
#endif

init {
  atomic {
    acked[1] = NONE; acked[2] = NONE;
    run Caller(1, 1);
#ifdef REUSE
    run Caller(2, 2);
#else
    run Caller(2, 1);
#endif
  }
  (done == NCALLERS);
  /* Every acknowledged order is still committed (after any failover). */
  assert(acked[1] == NONE || order_committed[acked[1]]);
  assert(acked[2] == NONE || order_committed[acked[2]])
}
