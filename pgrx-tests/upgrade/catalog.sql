-- Every object of the ekm extension and what defines it, one sorted line
-- each: the upgrade test compares this between a database updated with
-- ALTER EXTENSION ekm UPDATE and a fresh install of the same version.
WITH ext AS (SELECT oid, extconfig, extcondition, extversion FROM pg_extension WHERE extname = 'ekm'),
member AS (
  SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
  WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
),
lines AS (
  -- the members themselves
  SELECT 'member ' || pg_describe_object(classid, objid, objsubid) AS line FROM member
  -- functions: full definition and privileges
  UNION ALL
  SELECT 'function ' || p.oid::regprocedure || E'\n' || pg_get_functiondef(p.oid)
         || ' acl=' || coalesce(p.proacl::text, 'default')
  FROM pg_proc p JOIN member m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
  -- relations: kind, privileges, comment
  UNION ALL
  SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' acl=' || coalesce(c.relacl::text, 'default')
         || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
  FROM pg_class c JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
  -- columns, in order, with types, nullability, defaults, generation
  UNION ALL
  SELECT 'column ' || c.oid::regclass || ' #' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
         || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
         || CASE WHEN a.attgenerated <> '' THEN ' generated ' || a.attgenerated::text ELSE '' END
  FROM pg_class c JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
  -- constraints, indexes, triggers of the member tables
  UNION ALL
  SELECT 'constraint ' || co.conrelid::regclass || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
  FROM pg_constraint co JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = co.conrelid
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = i.indrelid
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = t.tgrelid
  WHERE NOT t.tgisinternal
  -- views
  UNION ALL
  SELECT 'view ' || c.oid::regclass || E'\n' || pg_get_viewdef(c.oid)
  FROM pg_class c JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
  WHERE c.relkind = 'v'
  -- schemas and their privileges
  UNION ALL
  SELECT 'schema ' || n.nspname || ' acl=' || coalesce(n.nspacl::text, 'default')
  FROM pg_namespace n JOIN member m ON m.classid = 'pg_namespace'::regclass AND m.objid = n.oid
  -- configuration tables pg_dump keeps (a set: the order they were added differs)
  UNION ALL
  SELECT 'config ' || cfg::regclass || ' where=' || coalesce(cond, '')
  FROM ext, unnest(ext.extconfig, ext.extcondition) AS u(cfg, cond)
  -- the initial privileges pg_dump compares against
  UNION ALL
  SELECT 'init_privs ' || pg_describe_object(ip.classoid, ip.objoid, ip.objsubid) || ' ' || ip.privtype::text || ' ' || ip.initprivs::text
  FROM pg_init_privs ip JOIN member m ON m.classid = ip.classoid AND m.objid = ip.objoid
  UNION ALL
  SELECT 'version ' || extversion FROM ext
)
SELECT line FROM lines ORDER BY line;
