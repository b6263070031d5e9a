/*
 * SQLite group commit, as src/store/sqlite/ runs it; checked with spin
 * (model/check runs every configuration and checks each verdict).
 *
 * Two callers with one key and one payload (a duplicate that can land in
 * one batch; THIRD_CALLER adds one with another key), each attempt a job
 * queued to one of two server processes sharing the file. Each step names the
 * function it mirrors:
 *   lookup        SqliteStore::place_order's replay lookup on a reader
 *                 (batch::batch_reader, statements::read_keys): a live key
 *                 is answered without the write lock
 *   queue         the job sent to the process's batch writer
 *   take_batch    batch::batch_writer: the first waiting job and every other
 *                 one already waiting
 *   begin         batch::write_batch: BEGIN IMMEDIATE, the file's write lock
 *                 (both processes take turns on it)
 *   claim         Attempt::send for each job once the lock is held: a job
 *                 whose caller gave up (Attempt::abandon won) is left out
 *   write         batch::insert_new, then place::place for keys it did not
 *                 take: a duplicate inside the batch sees the batch's row
 *                 and replays it
 *   commit        COMMIT: done, refused whole (BUSY: nothing written), or
 *                 failed otherwise (I/O: written or not, unknown)
 *   answer        each job's answer, only after the commit that holds it
 *   give_up       the caller's deadline: Attempt::abandon before its job is
 *                 claimed ("not written"), or after ("outcome unknown")
 * A process may crash before or after its COMMIT (its batch answers nothing).
 *
 * Invariants: no key has two orders; an acknowledged order is committed with
 * its caller's payload, and still is at the end; a "not written" or refused
 * answer's job is never written; no call blocks for ever.
 *
 * ONE_PROCESS: one server process on the file (the suite's size); by
 * default two share it.
 *
 * Mutants (-D; model/check lists the verdict each must give):
 *   ANSWER_EARLY  a batch answers before its commit (must fail)
 *   NO_CLAIM      a job is written even if its caller gave up (must fail)
 *   NO_FILE_LOCK  the two processes write without the file's lock (must fail)
 */

#ifdef THIRD_CALLER
#define NCALLERS 3
#else
#define NCALLERS 2
#endif
#define ATTEMPTS 2
#define NJOBS    7        /* NCALLERS * ATTEMPTS, and one spare */
#define NORDERS  7
#define NONE     255

#define PENDING   0
#define SENT      1
#define ABANDONED 2

#define ACK         1
#define REFUSED     2
#define NOT_WRITTEN 3
#define UNKNOWN     4

/* The file's committed state: two keys. */
bool key_exists[2];
byte key_order[2];
byte n_orders = 0;
byte order_key[NORDERS], order_fp[NORDERS];
bool order_committed[NORDERS];

/* Jobs: one per attempt. */
byte n_jobs = 0;
byte job_key[NJOBS], job_fp[NJOBS], job_state[NJOBS], job_answer[NJOBS], job_order[NJOBS];
bool job_written[NJOBS], job_told_not_written[NJOBS];

chan queue[2] = [NJOBS] of { byte };
byte file_lock = 0;
byte crashes = 0;
byte acked[NCALLERS];
byte done = 0;

proctype Writer(byte p) {
  byte batch[NJOBS], n, i, j, o, k;
  byte pending_key[2];       /* the batch's own key rows */
  bool committed, io_failure, crashed;
end:
  do
  :: atomic { queue[p] ? j ->
     /* take_batch */
     n = 0; batch[n] = j; n++;
     do
     :: nempty(queue[p]) -> queue[p] ? j; batch[n] = j; n++
     :: empty(queue[p]) -> break
     od };
     /* begin */
#ifndef NO_FILE_LOCK
     atomic { file_lock == 0 -> file_lock = p + 1 };
#endif
     pending_key[0] = NONE; pending_key[1] = NONE;
     /* claim and write */
     i = 0;
     do
     :: i == n -> break
     :: i < n -> atomic {
       j = batch[i]; i++;
#ifdef NO_CLAIM
       if :: job_state[j] != SENT -> job_state[j] = SENT :: else -> skip fi;
#else
       if :: job_state[j] == PENDING -> job_state[j] = SENT :: else -> skip fi;
#endif
       if
       :: job_state[j] == SENT ->
            k = job_key[j];
            if
            :: !key_exists[k] && pending_key[k] == NONE ->
               o = n_orders; order_key[o] = k; order_fp[o] = job_fp[j]; order_committed[o] = false;
               n_orders++; pending_key[k] = o; job_order[j] = o; job_answer[j] = ACK
            :: else ->
               if :: key_exists[k] -> o = key_order[k] :: else -> o = pending_key[k] fi;
               if
               :: order_fp[o] == job_fp[j] -> job_order[j] = o; job_answer[j] = ACK   /* replay */
               :: else -> job_answer[j] = REFUSED
               fi
            fi
       :: else -> job_answer[j] = NONE    /* its caller gave up: left out */
       fi }
     od;
#ifdef ANSWER_EARLY
     atomic {   /* the mutant: answered before the commit */
       for (i : 0 .. n - 1) { j = batch[i]; if :: job_state[j] == SENT && job_answer[j] == ACK -> job_state[j] = 3 :: else -> skip fi }
     }
#endif
     /* commit */
     atomic {
     committed = false; io_failure = false; crashed = false;
     if
     :: crashes < 1 -> crashes++; crashed = true      /* killed before its COMMIT */
     :: committed = true                              /* done */
     :: skip                                          /* BUSY: refused whole, nothing written */
     :: committed = true; io_failure = true           /* I/O error after the frames were written */
     :: io_failure = true                             /* I/O error before */
     fi;
       if
       :: committed ->
          for (k : 0 .. 1) {
            if
            :: pending_key[k] != NONE ->
               assert(!key_exists[k]);                   /* no key has two orders */
               key_exists[k] = true; key_order[k] = pending_key[k]; order_committed[pending_key[k]] = true
            :: else -> skip
            fi
          };
          for (i : 0 .. n - 1) {
            j = batch[i];
            if
            :: job_state[j] == SENT && job_answer[j] == ACK && order_key[job_order[j]] == job_key[j] &&
               pending_key[job_key[j]] == job_order[j] -> job_written[j] = true
            :: else -> skip
            fi
          }
       :: else -> skip
       fi;
     /* answer, after the commit */
     if
     :: crashed -> skip
     :: !crashed && crashes < 1 && committed -> crashes++   /* killed after its COMMIT: no answers */
     :: !crashed ->
        {
          for (i : 0 .. n - 1) {
            j = batch[i];
            if
            :: job_state[j] == SENT && io_failure -> job_answer[j] = UNKNOWN
            :: job_state[j] == SENT && !committed -> job_answer[j] = NOT_WRITTEN
            :: job_state[j] == SENT && committed -> job_state[j] = 3   /* answered */
            :: else -> skip
            fi;
            if :: job_state[j] == SENT -> job_state[j] = 3 :: else -> skip fi
          }
        }
     fi;
#ifndef NO_FILE_LOCK
     file_lock = 0   /* released, however the batch ended */
#endif
     }
  :: done == NCALLERS -> break
  od
}

proctype Caller(byte me; byte key; byte fp) {
  byte attempts = 0, j, o;
  do
  :: attempts < ATTEMPTS ->
     attempts++;
     /* lookup: a committed key is answered from a reader */
     atomic {
       if
       :: key_exists[key] && order_fp[key_order[key]] == fp -> o = key_order[key]; goto acknowledged
       :: key_exists[key] -> break     /* refused */
       :: else -> skip
       fi
     }
     /* queue */
     atomic {
       j = n_jobs; n_jobs++;
       job_key[j] = key; job_fp[j] = fp; job_state[j] = PENDING; job_answer[j] = NONE; job_order[j] = NONE;
#ifdef ONE_PROCESS
       queue[0] ! j
#else
       if :: queue[0] ! j :: queue[1] ! j fi
#endif
     }
     /* the answer, or the caller's deadline */
     if
     :: atomic { job_state[j] == 3 && job_answer[j] == ACK -> o = job_order[j] }; goto acknowledged
     :: atomic { job_state[j] == 3 && job_answer[j] == REFUSED -> assert(!job_written[j]) }; break
     :: atomic { job_state[j] == 3 && job_answer[j] == NOT_WRITTEN -> job_told_not_written[j] = true }
     :: atomic { job_state[j] == 3 && job_answer[j] == UNKNOWN -> skip }
     :: atomic { job_state[j] == PENDING -> job_state[j] = ABANDONED; job_told_not_written[j] = true }
     :: atomic { job_state[j] == SENT -> skip }       /* deadline after the claim: outcome unknown */
     fi
  :: else -> break
  od;
  goto finished;
acknowledged:
  assert(order_committed[o] && order_fp[o] == fp);
  acked[me] = o;
finished:
  done++
}

init {
  byte c;
  atomic {
    for (c : 0 .. NCALLERS - 1) { acked[c] = NONE };
    run Writer(0);
#ifndef ONE_PROCESS
    run Writer(1);
#endif
    run Caller(0, 0, 1);
    run Caller(1, 0, 1);
#ifdef THIRD_CALLER
    run Caller(2, 1, 2);
#endif
  }
  (done == NCALLERS);
  for (c : 0 .. NCALLERS - 1) { assert(acked[c] == NONE || order_committed[acked[c]]) };
  for (c : 0 .. NJOBS - 1) { assert(!(job_told_not_written[c] && job_written[c])) }
}
