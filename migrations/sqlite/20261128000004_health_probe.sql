-- One row the health check rewrites every --health-interval: readiness
-- follows whether the file takes writes (a full disk, a read-only or
-- immutable file, a lock held elsewhere), not only whether it can be read.
create table health_probe (
    id integer primary key check (id = 1),
    probes integer not null
);
insert into health_probe (id, probes) values (1, 0);
