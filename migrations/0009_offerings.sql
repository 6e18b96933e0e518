-- A version's prompts, resources, resource templates and instructions, recorded by its trial run
-- beside its tools; approvals pin them in `pins` (keys `prompt:<name>`, `resource:<uri>`,
-- `template:<uriTemplate>`, `server:instructions`) and may allow only some of them.
-- depends: 0007_approval_policies

-- {prompts: [...], resources: [...], resourceTemplates: [...], instructions: text | null,
--  samples: {pin key: text the model would read}}
ALTER TABLE registry_versions ADD COLUMN offerings jsonb NOT NULL DEFAULT '{}'::jsonb;
-- NULL: all of them when `tools` is NULL too, none when the approval allows only some tools.
ALTER TABLE approvals ADD COLUMN prompts text[];
-- Resource URIs and URI templates; NULL as for prompts.
ALTER TABLE approvals ADD COLUMN resources text[];
