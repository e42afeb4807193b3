-- Argo CD health check for sluice.dev/InferenceSet (docs/inference.md, "Argo CD").
-- Argo CD runs this with `obj` (the live object) and reads `hs.status` and `hs.message`.
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1) and tested with lua5.4
-- (operator/tests/argocd_health.rs): basic functions and `string` only.
local hs = {}

local function int(n)
  return string.format("%d", n)
end

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

-- A condition written for an older generation than the live spec says nothing about it.
local function current(c, generation)
  return c ~= nil and (generation == nil or c.observedGeneration == nil
    or c.observedGeneration >= generation)
end

local function is_true(c, generation)
  return c ~= nil and c.status == "True" and current(c, generation)
end

local function first(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if v ~= nil and v ~= "" then
      return v
    end
  end
  return ""
end

local generation = obj.metadata and obj.metadata.generation
local status = obj.status

if status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the Sluice operator to report the InferenceSet's status"
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  if status.observedGeneration == nil then
    hs.message = "waiting for the controller to observe generation " .. int(generation)
  else
    hs.message = "waiting for the controller to observe generation " .. int(generation)
      .. " (status is of generation " .. int(status.observedGeneration) .. ")"
  end
  return hs
end

local degraded = condition(status, "Degraded")
local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
local message = status.message

-- Invalid spec, a replica that did not warm up in time (the rollout holds).
if is_true(degraded, generation) then
  hs.status = "Degraded"
  hs.message = first(degraded.message, message, degraded.reason)
  if degraded.reason ~= nil and degraded.reason ~= "" then
    hs.message = degraded.reason .. ": " .. hs.message
  end
  return hs
end

local counts = ""
if status.servingReplicas ~= nil and obj.spec ~= nil and obj.spec.replicas ~= nil then
  counts = " (" .. int(status.servingReplicas) .. "/" .. int(obj.spec.replicas) .. " serving)"
end

local paused = obj.spec ~= nil and obj.spec.updateStrategy ~= nil and obj.spec.updateStrategy.paused == true

if is_true(progressing, generation) then
  -- Paused holds only a rollout: a paused set with nothing to roll is as healthy as any.
  if paused then
    hs.status = "Suspended"
  else
    hs.status = "Progressing"
  end
  hs.message = first(message, progressing.message, "rolling out") .. counts
  return hs
end

if is_true(ready, generation) then
  hs.status = "Healthy"
  hs.message = first(message, ready.message, "all replicas serving")
  return hs
end

if ready ~= nil and current(ready, generation) and progressing ~= nil and current(progressing, generation) then
  -- Not ready and not rolling out: nothing the controller does will bring it back.
  hs.status = "Degraded"
  hs.message = first(ready.message, message, ready.reason) .. counts
  return hs
end

hs.status = "Progressing"
hs.message = "waiting for the Sluice operator to set the InferenceSet's conditions"
return hs
