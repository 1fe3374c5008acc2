-- keybrake's ledger on PostgreSQL: the request path's two transactions, reserve and settle,
-- each one server-side function, so a call costs one round trip.
--
-- Loaded by keybrake.proxy.store.postgres under the migration lock, never by a migration: a
-- build whose rule version (keybrake.proxy.decisions.RULE_VERSION) is newer than the database's
-- drops every keybrake_ function and creates these; an older build creates nothing and refuses
-- vendor calls. Each double-braced name is filled in when the file is loaded, from the decision
-- module:
-- the parameter lists (named, from one list in Python), the rule version, the cut-off and
-- cap-hit decisions and each decision's HTTP status, so no call pays to pass them.

-- An owner's (key's or budget's) lock and call count. UPDATE before INSERT: the row exists
-- but for the first call, and an upsert that meets its row costs more than an update.
CREATE FUNCTION keybrake_count_call(p_owner text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE usage_counts SET calls = calls + 1 WHERE owner_id = p_owner;
    IF NOT FOUND THEN
        INSERT INTO usage_counts (owner_id, calls) VALUES (p_owner, 1)
            ON CONFLICT (owner_id) DO UPDATE SET calls = usage_counts.calls + 1;
    END IF;
END
$fn$;

-- Adds to an owner's spend in one bucket (negative amounts release).
CREATE FUNCTION keybrake_add_spend(p_owner text, p_bucket bigint, p_settled bigint,
                                   p_reserved bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE spend_window SET settled_micros = settled_micros + p_settled,
                            reserved_micros = reserved_micros + p_reserved
     WHERE owner_id = p_owner AND bucket = p_bucket;
    IF NOT FOUND THEN
        INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros)
        VALUES (p_owner, p_bucket, p_settled, p_reserved)
        ON CONFLICT (owner_id, bucket) DO UPDATE
           SET settled_micros = spend_window.settled_micros + p_settled,
               reserved_micros = spend_window.reserved_micros + p_reserved;
    END IF;
END
$fn$;

CREATE FUNCTION keybrake_add_caller_spend(p_key_id text, p_caller text, p_settled bigint,
                                          p_reserved bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE caller_spend SET settled_micros = settled_micros + p_settled,
                            reserved_micros = reserved_micros + p_reserved
     WHERE key_id = p_key_id AND caller = p_caller;
    IF NOT FOUND THEN
        INSERT INTO caller_spend (key_id, caller, settled_micros, reserved_micros)
        VALUES (p_key_id, p_caller, p_settled, p_reserved)
        ON CONFLICT (key_id, caller) DO UPDATE
           SET settled_micros = caller_spend.settled_micros + p_settled,
               reserved_micros = caller_spend.reserved_micros + p_reserved;
    END IF;
END
$fn$;


-- Moves a payer's marks on an object within the window, and the spend they stand for, to
-- this call's bucket: the money moves now, so every window from now on counts it.
CREATE FUNCTION keybrake_redate(p_vendor text, p_object text, p_key_id text,
                                p_budget_id text, p_floor bigint, p_bucket bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    m record;
BEGIN
    FOR m IN DELETE FROM paid_for
              WHERE vendor = p_vendor AND object_id = p_object AND bucket >= p_floor
                AND bucket <> p_bucket
                AND (key_id = p_key_id OR (budget_id IS NOT NULL AND budget_id = p_budget_id))
          RETURNING key_id, budget_id, bucket, micros
    LOOP
        IF m.budget_id IS NOT NULL THEN
            PERFORM keybrake_add_spend(m.budget_id, m.bucket, -m.micros, 0);
            PERFORM keybrake_add_spend(m.budget_id, p_bucket, m.micros, 0);
        END IF;
        PERFORM keybrake_add_spend(m.key_id, m.bucket, -m.micros, 0);
        PERFORM keybrake_add_spend(m.key_id, p_bucket, m.micros, 0);
        INSERT INTO paid_for (vendor, object_id, key_id, budget_id, bucket, micros)
        VALUES (p_vendor, p_object, m.key_id, m.budget_id, p_bucket, m.micros)
        ON CONFLICT (vendor, object_id, key_id, bucket)
        DO UPDATE SET micros = paid_for.micros + EXCLUDED.micros;
    END LOOP;
END
$fn$;

-- keybrake.proxy.decisions.admit, restated; tests/test_decision_table.py holds the two to
-- one table of cases. Calls of one key (and of one budget) serialise on its usage_counts
-- row, taken first: the budget's, then the key's.
CREATE FUNCTION keybrake_reserve({{ reserve_parameters }}) RETURNS TABLE (o_decision text, o_audit_id bigint, o_status integer, o_headers jsonb,
                 o_body bytea, o_forward_key text, o_prior_audit_id bigint,
                 o_reserved bigint, o_retry_after integer, o_reported text)
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
DECLARE
    k record;
    -- the budget's (scalars, not a record: a key without a budget leaves them unset)
    b_revoked timestamptz;
    b_expires timestamptz;
    b_daily bigint;
    b_total bigint;
    b_window bigint;
    b_life bigint;
    b_rate integer;
    b_rate_mode text;
    b_rev integer;
    rate record;
    used bigint;
    need bigint;
    retry integer;
    wait integer;
    rate_noted boolean := false;
    note text;  -- the audit row's `reported`, when a report-only policy saw something
    d text := 'forwarded';
    prior record;
    prior_kind text;
    prior_decision text;
    caller_used bigint;
    fwd text := p_fwd;
    prior_id bigint;
    aid bigint;
    rep_status integer;
    rep_headers jsonb;
    rep_body bytea;
    paid bigint := 0;
    cost bigint := p_cost;
BEGIN
    -- Admission by the rules this database holds, only: a replica of another version (an
    -- older build during a rolling upgrade) gets this error and forwards nothing.
    IF p_rules IS DISTINCT FROM {{ rule_version }} THEN
        RAISE EXCEPTION 'keybrake ledger rules %: the caller enforces %', {{ rule_version }},
              p_rules USING ERRCODE = 'KB001', DETAIL = '{{ rule_version }}';
    END IF;
    IF p_budget_id IS NOT NULL THEN
        PERFORM keybrake_count_call(p_budget_id);
    END IF;
    UPDATE usage_counts SET calls = calls + 1 WHERE owner_id = p_key_id;  -- inline: hot
    IF NOT FOUND THEN
        PERFORM keybrake_count_call(p_key_id);
    END IF;
    -- The key, and what it used in the window and over its life, in one statement.
    SELECT v.revoked_at, v.expires_at, v.daily_cap_micros, v.total_cap_micros,
           v.max_per_call_micros, v.max_per_caller_micros, v.dedupe_window_s, v.label,
           v.max_calls_per_minute, v.rate_mode, v.policy_rev, w.in_window, w.in_life
      INTO k
      FROM vault_keys v,
           LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                    FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                           coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                      FROM spend_window WHERE owner_id = p_key_id) w
     WHERE v.key_id = p_key_id;
    IF p_budget_id IS NOT NULL THEN
        SELECT g.revoked_at, g.expires_at, g.daily_cap_micros, g.total_cap_micros,
               g.max_calls_per_minute, g.rate_mode, g.policy_rev, w.in_window, w.in_life
          INTO b_revoked, b_expires, b_daily, b_total, b_rate, b_rate_mode, b_rev, b_window,
               b_life
          FROM budgets g,
               LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                        FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                               coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                          FROM spend_window WHERE owner_id = p_budget_id) w
         WHERE g.budget_id = p_budget_id;
    END IF;
    IF (k.expires_at IS NOT NULL AND k.policy_rev <> p_key_rev)
       OR (b_expires IS NOT NULL AND b_rev <> p_budget_rev) THEN
        -- Judged against older constraints (rule 0): nothing is written, the counts just taken
        -- are given back, and the caller judges the call again.
        UPDATE usage_counts SET calls = calls - 1 WHERE owner_id IN (p_key_id, p_budget_id);
        RETURN QUERY SELECT 'policy_changed'::text, 0::bigint, NULL::integer, NULL::jsonb,
                            NULL::bytea, NULL::text, NULL::bigint, 0::bigint, NULL::integer,
                            NULL::text;
        RETURN;
    END IF;
    IF k.expires_at IS NULL OR k.revoked_at IS NOT NULL THEN
        d := 'revoked';
    ELSIF k.expires_at <= p_now THEN
        d := 'expired';
    ELSIF p_budget_id IS NOT NULL AND (b_expires IS NULL OR b_revoked IS NOT NULL) THEN
        d := 'budget_revoked';
    ELSIF p_budget_id IS NOT NULL AND b_expires <= p_now THEN
        d := 'budget_expired';
    ELSE
        IF p_idem IS NOT NULL THEN
            SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
              INTO prior FROM replays
             WHERE key_id = p_key_id AND kind = 'idempotency' AND token = p_idem;
            IF FOUND THEN
                prior_kind := 'idempotency';
                IF prior.request_hash <> p_hash THEN
                    d := 'idempotency_mismatch';
                END IF;
            END IF;
        END IF;
        IF prior_kind IS NULL AND p_dedupe THEN
            SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
              INTO prior FROM replays
             WHERE key_id = p_key_id AND kind = 'dedupe' AND token = p_dedupe_token;
            IF FOUND AND prior.created_at >= p_now - make_interval(secs => k.dedupe_window_s)
            THEN
                prior_kind := 'dedupe';
            END IF;
        END IF;
        IF p_paid_object IS NOT NULL THEN
            -- What this call's payer (the key, or a key on its budget) paid for the object
            -- within the window offsets its cost.
            SELECT coalesce(sum(micros), 0) INTO paid FROM paid_for
             WHERE vendor = p_vendor AND object_id = p_paid_object AND bucket >= p_floor
               AND (key_id = p_key_id OR (budget_id IS NOT NULL AND budget_id = p_budget_id));
            cost := greatest(0, p_cost - paid);
        END IF;
        IF d = 'forwarded' AND prior_kind IS NOT NULL THEN
            IF prior.status IS NOT NULL THEN
                d := CASE WHEN prior_kind = 'idempotency' THEN 'replayed'
                          ELSE 'deduplicated' END;
                rep_status := prior.status;
                rep_headers := prior.headers;
                rep_body := prior.body;
            ELSE
                SELECT decision INTO prior_decision FROM audit WHERE id = prior.audit_id;
                IF FOUND AND prior_decision NOT IN ({{ cut_off }}) THEN
                    d := 'in_progress';
                ELSIF NOT p_replays OR prior.forwarded_key IS NULL THEN
                    d := 'outcome_unknown';
                    prior_id := prior.audit_id;
                ELSE
                    fwd := prior.forwarded_key;
                END IF;
            END IF;
        END IF;
        IF d = 'forwarded' AND k.max_per_call_micros IS NOT NULL
           AND cost > k.max_per_call_micros THEN
            d := 'per_call_cap_hit';
        ELSIF d = 'forwarded' AND cost > 0 THEN
            IF k.max_per_caller_micros IS NOT NULL THEN
                SELECT settled_micros + reserved_micros INTO caller_used FROM caller_spend
                 WHERE key_id = p_key_id AND caller = p_caller;
            END IF;
            IF k.max_per_caller_micros IS NOT NULL
               AND coalesce(caller_used, 0) + cost > k.max_per_caller_micros THEN
                d := 'caller_cap_hit';
            ELSIF k.daily_cap_micros IS NOT NULL
                  AND k.in_window + cost > k.daily_cap_micros THEN
                d := 'cap_hit';
            ELSIF k.total_cap_micros IS NOT NULL
                  AND k.in_life + cost > k.total_cap_micros THEN
                d := 'total_cap_hit';
            ELSIF p_budget_id IS NOT NULL
                  AND ((b_daily IS NOT NULL AND b_window + cost > b_daily)
                    OR (b_total IS NOT NULL AND b_life + cost > b_total)) THEN
                d := 'budget_cap_hit';
            END IF;
        END IF;
        -- Last, what reaches the vendor at all: the key's, then the budget's call rate.
        IF d = 'forwarded' AND (k.max_calls_per_minute IS NOT NULL OR b_rate IS NOT NULL) THEN
            FOR rate IN SELECT * FROM (VALUES (1, p_key_id, k.max_calls_per_minute, k.rate_mode),
                                              (2, p_budget_id, b_rate, b_rate_mode))
                                   AS t (n, owner, lim, mode)
                         WHERE t.owner IS NOT NULL AND t.lim IS NOT NULL ORDER BY t.n LOOP
                SELECT coalesce(sum(calls), 0) INTO used FROM call_rate
                 WHERE owner_id = rate.owner AND second >= p_second - {{ rate_seconds }};
                need := used + 1 - rate.lim;
                CONTINUE WHEN need <= 0;
                IF rate.mode = 'report' THEN
                    rate_noted := true;
                    CONTINUE;
                END IF;
                d := 'rate_limited';
                -- Until the oldest calls that must leave the window have left it, in every
                -- full rate: the longest wait.
                SELECT s.second + {{ rate_seconds }} + 1 - p_second INTO wait
                  FROM (SELECT second, sum(calls) OVER (ORDER BY second) AS run FROM call_rate
                         WHERE owner_id = rate.owner
                           AND second >= p_second - {{ rate_seconds }}) s
                 WHERE s.run >= need ORDER BY s.second LIMIT 1;
                retry := greatest(retry, 1, coalesce(wait, {{ rate_seconds }} + 1));
            END LOOP;
            IF d = 'forwarded' THEN
                INSERT INTO call_rate (owner_id, second, calls)
                SELECT t.owner, p_second, 1
                  FROM (VALUES (p_key_id, k.max_calls_per_minute), (p_budget_id, b_rate))
                       AS t (owner, lim)
                 WHERE t.owner IS NOT NULL AND t.lim IS NOT NULL
                ON CONFLICT (owner_id, second) DO UPDATE SET calls = call_rate.calls + 1;
            END IF;
        END IF;
        IF d = 'forwarded' AND cost > 0 THEN
            IF p_budget_id IS NOT NULL THEN
                PERFORM keybrake_add_spend(p_budget_id, p_bucket, 0, cost);
            END IF;
            UPDATE spend_window SET reserved_micros = reserved_micros + cost
             WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
            IF NOT FOUND THEN
                PERFORM keybrake_add_spend(p_key_id, p_bucket, 0, cost);
            END IF;
            IF k.max_per_caller_micros IS NOT NULL THEN
                PERFORM keybrake_add_caller_spend(p_key_id, p_caller, 0, cost);
            END IF;
        END IF;
    END IF;
    IF d = 'forwarded' AND paid > 0 THEN
        PERFORM keybrake_redate(p_vendor, p_paid_object, p_key_id, p_budget_id, p_floor,
                                p_bucket);
    END IF;
    IF d IN ({{ cap_hits }}) THEN
        UPDATE usage_counts SET cap_hits = cap_hits + 1
         WHERE owner_id IN (p_key_id, p_budget_id);
    END IF;
    IF p_report IS NOT NULL OR (rate_noted AND d = 'forwarded') THEN
        note := concat_ws('; ', p_report,
                          CASE WHEN rate_noted AND d = 'forwarded' THEN '{{ rate_note }}' END);
    END IF;
    INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision,
                       reserved_micros, amount, currency, idempotency_key, caller_tag,
                       budget_id, reported)
    VALUES (p_now, p_key_id, k.label, p_vendor, p_method, p_path,
            coalesce(rep_status, {{ status_of_d }}),
            CASE WHEN d = 'forwarded' THEN 'in_flight' ELSE d END,
            CASE WHEN d = 'forwarded' THEN cost ELSE 0 END,
            p_amount, p_currency, p_idem, p_tag, p_budget_id, note)
    RETURNING id INTO aid;
    IF d = 'forwarded' AND (p_idem IS NOT NULL OR p_dedupe) THEN
        INSERT INTO replays (key_id, kind, token, request_hash, created_at, audit_id,
                             forwarded_key)
        SELECT p_key_id, t.kind, t.token, p_hash, p_now, aid, fwd
          FROM (VALUES ('idempotency', p_idem), ('dedupe', p_dedupe_token)) AS t (kind, token)
         WHERE (t.kind = 'idempotency' AND p_idem IS NOT NULL)
            OR (t.kind = 'dedupe' AND p_dedupe)
        ON CONFLICT (key_id, kind, token) DO UPDATE
           SET request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at,
               status = NULL, headers = NULL, body = NULL, audit_id = EXCLUDED.audit_id,
               forwarded_key = EXCLUDED.forwarded_key;
    END IF;
    RETURN QUERY SELECT d, aid, rep_status, rep_headers, rep_body, fwd, prior_id,
                        CASE WHEN d = 'forwarded' THEN cost ELSE 0::bigint END,
                        CASE WHEN d = 'rate_limited' THEN retry END, note;
END
$fn$;

CREATE FUNCTION keybrake_settle({{ settle_parameters }}) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
DECLARE
    was text;
    release bigint := p_reserved;
    charge bigint := p_settled;
BEGIN
    -- The audit row by its primary key (a lookup through the partial in-flight index read
    -- every dead entry it held until vacuum, and slowed down as they piled up).
    SELECT decision INTO was FROM audit WHERE id = p_audit_id FOR UPDATE;
    UPDATE audit SET status = p_status, decision = p_decision, settled_micros = p_settled,
                     vendor_request_id = p_request_id, latency_ms = p_latency
     WHERE id = p_audit_id;
    IF was IS DISTINCT FROM 'in_flight' THEN
        -- A sweep already counted this reservation as spent: correct it to the outcome.
        release := 0;
        charge := p_settled - p_reserved;
    END IF;
    IF release <> 0 OR charge <> 0 THEN
        IF p_budget_id IS NOT NULL THEN
            PERFORM keybrake_add_spend(p_budget_id, p_bucket, charge, -release);
        END IF;
        UPDATE spend_window SET settled_micros = settled_micros + charge,
                                reserved_micros = reserved_micros - release
         WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
        IF NOT FOUND THEN
            PERFORM keybrake_add_spend(p_key_id, p_bucket, charge, -release);
        END IF;
        IF p_caller IS NOT NULL THEN
            PERFORM keybrake_add_caller_spend(p_key_id, p_caller, charge, -release);
        END IF;
    END IF;
    -- Only the tokens this call still holds: a retry may have taken them over since.
    IF p_idem IS NULL AND NOT p_dedupe THEN
        NULL;  -- it holds none
    ELSIF p_keep THEN
        UPDATE replays SET status = p_status, headers = p_headers, body = p_body
         WHERE key_id = p_key_id AND audit_id = p_audit_id
           AND ((kind = 'idempotency' AND token = p_idem)
                OR (p_dedupe AND kind = 'dedupe' AND token = p_dedupe_token));
    ELSIF p_known THEN
        DELETE FROM replays
         WHERE key_id = p_key_id AND audit_id = p_audit_id
           AND ((kind = 'idempotency' AND token = p_idem)
                OR (p_dedupe AND kind = 'dedupe' AND token = p_dedupe_token));
    END IF;
    -- Each object this call paid for is marked paid by its key and budget, for the settled
    -- amount in its bucket (see keybrake_reserve's offset).
    IF p_settled > 0 AND p_counts IS NOT NULL AND jsonb_array_length(p_counts) > 0 THEN
        INSERT INTO paid_for (vendor, object_id, key_id, budget_id, bucket, micros)
        SELECT DISTINCT p_vendor, o, p_key_id, p_budget_id, p_bucket, p_settled
          FROM jsonb_array_elements_text(p_counts) AS o
        ON CONFLICT (vendor, object_id, key_id, bucket)
        DO UPDATE SET micros = paid_for.micros + EXCLUDED.micros;
    END IF;
END
$fn$;
